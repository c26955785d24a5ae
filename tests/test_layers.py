"""Imports point one way: the import-linter contracts in pyproject.toml (front ends over the
engine over the kernels; inside the engine, loop over llm over llm_engine over decoding and
processing over model over core; no torch in core/ nor in the records front ends use), checked
on the installed source tree. A back-pointing import anywhere fails this test with its chain."""
from __future__ import annotations

import shutil
import sys
from pathlib import Path

from importlinter.cli import lint_imports

ROOT = Path(__file__).resolve().parents[1]


def test_the_import_contracts_hold(capsys):
    code = lint_imports(config_filename=str(ROOT / "pyproject.toml"), no_cache=True, no_logo=True)
    report = capsys.readouterr().out
    assert code == 0, report
    assert "broken" not in report.lower().replace("0 broken", "")


def test_a_back_pointing_import_breaks_a_contract(tmp_path, monkeypatch, capsys):
    """The contracts can fail: a copy of the package whose core imports the model is refused."""
    pkg = tmp_path / "chatpager"
    shutil.copytree(ROOT / "chatpager", pkg, ignore=shutil.ignore_patterns("__pycache__"))
    scheduler = pkg / "engine" / "core" / "scheduler.py"
    scheduler.write_text(scheduler.read_text() + "\nfrom chatpager.engine.model.kv_cache import KVCache  # noqa\n")
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in [m for m in sys.modules if m == "chatpager" or m.startswith("chatpager.")]:
        monkeypatch.delitem(sys.modules, name)  # the copy is the package the contracts find
    monkeypatch.chdir(tmp_path)
    code = lint_imports(config_filename=str(tmp_path / "pyproject.toml"), no_cache=True, no_logo=True)
    report = capsys.readouterr().out
    assert code != 0
    assert "chatpager.engine.core.scheduler -> chatpager.engine.model.kv_cache" in report

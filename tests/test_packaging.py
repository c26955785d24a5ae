"""What a non-editable install gets: the wheel carries the prompts and other data files, its
dependencies install off Linux, and `device="auto"` finds the best device there is."""
from __future__ import annotations

import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest
import torch
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """A wheel built from a copy of the sources (the build writes beside them)."""
    tmp = tmp_path_factory.mktemp("wheel")
    source = tmp / "src"
    shutil.copytree(ROOT / "chatpager", source / "chatpager",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(source), "--no-deps",
                    "--no-build-isolation", "-q", "-w", str(tmp / "dist")], check=True)
    [built] = (tmp / "dist").glob("chatpager-*.whl")
    return built


def test_the_wheel_carries_the_prompts_and_data_files(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    prompts = sorted(p.name for p in (ROOT / "chatpager" / "prompts").glob("*.md"))
    assert len(prompts) >= 6 and "_house_style.md" in prompts
    assert {f"chatpager/prompts/{name}" for name in prompts} <= names
    assert {"chatpager/tui/app.tcss", "chatpager/tui/swarm_turns.txt", "chatpager/kernels/cpu_int4.cpp",
            "chatpager/kernels/cpu_attention.cpp", "chatpager/kernels/cpu_simd.h"} <= names


def test_an_installed_wheel_loads_its_prompts(wheel, tmp_path):
    zipfile.ZipFile(wheel).extractall(tmp_path / "site")  # what pip install puts in site-packages
    probe = ("import chatpager.prompts as p; prompts = p.load_prompts(); "
             "print(p.PROMPTS_DIR); print(len(prompts)); print(prompts['assistant'][:40])")
    result = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True,
                            text=True, env={"PYTHONPATH": str(tmp_path / "site")}, check=True)
    folder, count, start = result.stdout.splitlines()
    assert Path(folder).is_relative_to(tmp_path / "site") and int(count) >= 6
    assert start and "@include" not in start


def test_triton_is_only_required_on_linux():
    dependencies = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    [triton] = [Requirement(d) for d in dependencies if d.startswith("triton")]
    assert triton.marker.evaluate({"sys_platform": "linux"})
    assert not triton.marker.evaluate({"sys_platform": "darwin"})
    assert not triton.marker.evaluate({"sys_platform": "win32"})


@pytest.mark.parametrize("cuda, mps, expected", [(True, True, "cuda"), (False, True, "mps"),
                                                 (False, False, "cpu")])
def test_auto_device_is_cuda_then_mps_then_cpu(monkeypatch, cuda, mps, expected):
    from chatpager.engine.llm import _pick_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: mps)
    assert _pick_device("auto").type == expected

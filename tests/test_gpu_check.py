"""benchmarks/gpu_check.sh without a GPU: its dry run goes through every stage on this CPU
(wheels sent in parts included) and writes a passing report; a budget too small fails it, and a
GPU run fails fast where there is no GPU. Its helpers: the report names failing tests, also
from a pytest cut short, and the wheel parts a GPU machine is sent are joined and checked."""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"


def load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


gpu_wheels, gpu_report = load("gpu_wheels"), load("gpu_report")


def make_wheel(folder: Path, name: str = "gpu_check_probe", version: str = "0.1") -> Path:
    """A minimal pure-Python wheel that pip installs."""
    folder.mkdir(parents=True, exist_ok=True)
    info = f"{name}-{version}.dist-info"
    files = {f"{name}/__init__.py": "VALUE = 42\n",
             f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
             f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    path = folder / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as z:
        for member, text in files.items():
            z.writestr(member, text)
        z.writestr(f"{info}/RECORD", "".join(f"{m},,\n" for m in [*files, f"{info}/RECORD"]))
    return path


def run_check(*args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=ROOT, env={**os.environ, **env}, capture_output=True,
                          text=True, timeout=400)


def test_dry_run_goes_through_every_stage_and_writes_a_passing_report(tmp_path):
    wheel = make_wheel(tmp_path / "built")
    calls = [tmp_path / "call1", tmp_path / "call2"]
    gpu_wheels.split(wheel, calls)  # as the default model's wheel travels
    out = tmp_path / "report"
    run = run_check("--dry-run", str(out), GPU_CHECK_WHEELS=":".join(map(str, calls)))
    assert run.returncode == 0, run.stdout + run.stderr
    report = json.loads((out / "gpu_check.json").read_text())
    assert report["ok"] and report["mode"] == "dry" and report["problems"] == []
    assert {s["name"]: s["status"] for s in report["stages"]} == dict.fromkeys(
        ["preflight", "install_wheels", "install", "tests", "kernel_bench", "throughput"], "ok")
    tests = report["tests"]
    assert tests["passed"] > 10 and tests["failed"] == tests["errors"] == 0
    assert tests["cuda_tests_ran"] == 0  # deselected without a GPU, not run
    assert report["kernel_bench"]["results"] and report["throughput"]["output_tokens_per_s"] > 0
    assert f"joined/{wheel.name}" in (out / "stages.log").read_text()  # the parts, joined, were installed
    assert (out / "gpu_check.txt").read_text().splitlines()[-1] == "result    OK"


def test_a_budget_too_small_leaves_stages_out_and_fails(tmp_path):
    run = run_check("--dry-run", str(tmp_path), GPU_CHECK_BUDGET_S="35")  # 30 s are kept for the report
    assert run.returncode == 1
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert not report["ok"]
    assert {s["name"]: s["status"] for s in report["stages"]}["tests"] == "not run"
    assert any(p.startswith("tests: not run (out of time") for p in report["problems"])


@pytest.mark.skipif(shutil.which("nvidia-smi") is not None, reason="this machine has nvidia-smi")
def test_a_gpu_run_without_a_gpu_fails_fast_with_one_line(tmp_path):
    run = run_check(str(tmp_path))
    assert run.returncode == 3
    assert run.stderr.splitlines() == ["gpu_check: FAILED at preflight: no nvidia-smi here: not a CUDA GPU machine"]
    assert json.loads((tmp_path / "gpu_check.json").read_text())["stages"][0]["status"] == "failed"


JUNIT = """<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest">
<testcase classname="tests.engine.test_cuda" name="test_each_layout_matches_transformers_on_cuda[llama]"/>
<testcase classname="tests.kernels.test_triton_kernels" name="test_triton_matches_reference[q1]">
<failure message="assert">boom</failure></testcase>
<testcase classname="tests.kernels.test_triton_kernels" name="test_compiles_without_a_gpu"><skipped/></testcase>
</testsuite></testsuites>"""


def test_the_report_names_the_gpu_and_the_failing_tests(tmp_path):
    (tmp_path / "stages.tsv").write_text("preflight\tok\t0\t30\tNVIDIA H200\ntests\tfailed (exit 1)\t90\t210\t\n")
    (tmp_path / "junit.xml").write_text(JUNIT)
    (tmp_path / "nvidia_smi.csv").write_text("NVIDIA H200, 580.159.04, 143771 MiB, 9.0\n")
    (tmp_path / "nvidia_smi.txt").write_text("| NVIDIA-SMI 580.159.04   Driver Version: 580.159.04   CUDA Version: 13.0 |")
    report = gpu_report.build(tmp_path, tmp_path, "gpu", budget=480, elapsed=100)
    assert not report["ok"]
    assert report["gpu"] == dict(name="NVIDIA H200", driver="580.159.04", memory="143771 MiB", compute_cap="9.0",
                                 cuda_driver_api="13.0")
    failing = "tests/kernels/test_triton_kernels.py::test_triton_matches_reference[q1]"
    t = report["tests"]
    assert (t["passed"], t["failed"], t["skipped"], t["cuda_tests_ran"], t["failing"]) == (1, 1, 1, 1, [failing])
    assert report["problems"] == ["tests: failed (exit 1)", f"test failed: {failing}"]
    text = gpu_report.render(report)
    assert f"  FAILED {failing}" in text and "NVIDIA H200, 143771 MiB, driver 580.159.04, CUDA 13.0" in text


def test_a_gpu_run_where_no_cuda_test_ran_fails(tmp_path):
    (tmp_path / "stages.tsv").write_text("tests\tok\t9\t210\t\n")
    (tmp_path / "junit.xml").write_text(JUNIT.replace("tests.engine.test_cuda", "tests.kernels.test_triton_kernels")
                                        .replace('<failure message="assert">boom</failure>', ""))
    assert gpu_report.build(tmp_path, tmp_path, "gpu", 480, 10)["problems"] == [
        "no test of tests/engine/test_cuda.py ran on the GPU"]
    assert gpu_report.build(tmp_path, tmp_path, "dry", 480, 10)["ok"]  # deselected without one


def test_a_pytest_cut_short_is_counted_from_its_log(tmp_path):
    (tmp_path / "pytest.log").write_text("tests/engine/test_cuda.py::test_a[llama] PASSED  [ 10%]\n"
                                         "tests/kernels/test_triton_kernels.py::test_b FAILED  [ 20%]\n"
                                         "[gw1] [ 30%] PASSED tests/engine/test_cuda.py::test_c \n"  # pytest-xdist
                                         "[gw0] [ 40%] ERROR tests/kernels/test_triton_kernels.py::test_d \n"
                                         "!!! KeyboardInterrupt !!!\n")
    t = gpu_report.read_tests(tmp_path)
    assert (t["passed"], t["failed"], t["errors"], t["cuda_tests_ran"]) == (2, 1, 1, 2)
    assert t["failing"] == ["tests/kernels/test_triton_kernels.py::test_b", "tests/kernels/test_triton_kernels.py::test_d"]


def test_wheel_parts_join_and_only_missing_distributions_are_chosen(tmp_path):
    wheel = make_wheel(tmp_path / "built")
    dirs = [tmp_path / "a", tmp_path / "b", tmp_path / "c"]
    parts = gpu_wheels.split(wheel, dirs)
    assert [p.name for p in parts] == [f"{wheel.name}.part{i}of3" for i in (1, 2, 3)]
    make_wheel(dirs[0], name="pytest", version="0.0")  # installed here already: not chosen
    [chosen] = gpu_wheels.select(dirs, tmp_path / "joined")
    assert chosen.name == wheel.name and chosen.read_bytes() == wheel.read_bytes()


def test_a_missing_or_foreign_part_is_named(tmp_path):
    wheel = make_wheel(tmp_path / "built")
    dirs = [tmp_path / "a", tmp_path / "b"]
    gpu_wheels.split(wheel, dirs)
    with pytest.raises(gpu_wheels.WheelError, match="part 1 of 2 missing"):
        gpu_wheels.select(dirs[1:], tmp_path / "joined")
    assert gpu_wheels.select(dirs[1:], tmp_path / "joined", skip_incomplete=True) == []  # --skip-model
    (dirs[0] / f"{wheel.name}.part1of2").write_bytes(b"another prepare's bytes")
    with pytest.raises(gpu_wheels.WheelError, match="sha256"):
        gpu_wheels.select(dirs, tmp_path / "joined")
    make_wheel(tmp_path / "c", version="0.1")
    make_wheel(tmp_path / "c", version="0.2")
    with pytest.raises(gpu_wheels.WheelError, match="two versions of gpu-check-probe"):
        gpu_wheels.select([tmp_path / "c"], tmp_path / "joined")

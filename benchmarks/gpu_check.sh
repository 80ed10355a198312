#!/usr/bin/env bash
# The whole GPU verification in one run (issue 16), for a GPU machine with a fixed image (its own torch and
# triton, no network): install, versions, the compiled kernel tests, bench_spmm, and `kdexport profile`
# torch vs torch-sparse on weight-pruned students. Every part's failure is recorded and the run goes on.
#
#   benchmarks/gpu_wheels.sh .whl                  # here, with network: the wheels the image lacks
#   benchmarks/gpu_check.sh OUTDIR                 # there: < 8 min (a --budget of 450 s by default)
#   benchmarks/gpu_check.sh OUTDIR --dry-run       # no GPU: every CPU-side part (interpreter, CPU backends)
#
# Options: --dry-run, --steps 1,2,3,4,5 (a subset), --wheels DIR (default: .whl at the repository root),
# --budget SECONDS (the whole run; parts are cut short with `timeout` so that it ends in time).
# OUTDIR holds at most 8 plain files, nothing below it (what the device tool brings back from $OUT):
#   summary.txt   one line per part: step, part, status (ok | FAILED (exit N) | TIMEOUT | skipped: why), seconds
#   tables.md     the markdown tables, ready for benchmarks/RESULTS.md
#   results.jsonl one JSON object per bench_spmm part and per profile run
#   1-install.log 2-versions.log 3-kernel-tests.log 4-bench.log 5-profile.log
# GPU mode installs into the running python3's environment (the image's; its torch is never touched: every
# install is --no-deps --no-index). The dry run installs the wheels into a scratch --target, only asks pip
# (--dry-run) whether the project would install, and so changes nothing in the environment.
set -uo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PY=${PYTHON:-python3}
DRY=0 STEPS=1,2,3,4,5 WHEELS=$ROOT/.whl BUDGET=450 OUTDIR=
usage() { echo "usage: benchmarks/gpu_check.sh OUTDIR [--dry-run] [--steps 1,2,3,4,5] [--wheels DIR] [--budget S]" >&2
          exit 2; }
while [ $# -gt 0 ]; do
    case $1 in
        --dry-run) DRY=1 ;;
        --steps) STEPS=${2:?--steps needs a comma list, e.g. 1,2,4}; shift ;;
        --wheels) WHEELS=${2:?--wheels needs a folder}; shift ;;
        --budget) BUDGET=${2:?--budget needs seconds}; shift ;;
        -h|--help) sed -n '2,19p' "$0"; exit 0 ;;
        -*) echo "unknown option $1" >&2; usage ;;
        *) [ -z "$OUTDIR" ] || usage; OUTDIR=$1 ;;
    esac
    shift
done
[ -n "$OUTDIR" ] || usage
[[ $STEPS =~ ^[1-5](,[1-5])*$ ]] || { echo "--steps takes a comma list of 1-5, got '$STEPS'" >&2; exit 2; }
[[ $BUDGET =~ ^[0-9]+$ ]] || { echo "--budget takes whole seconds, got '$BUDGET'" >&2; exit 2; }
if [ $DRY = 0 ] && ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
    echo "no CUDA GPU is visible to $PY's torch: run this on the GPU machine, or pass --dry-run" >&2
    exit 2
fi

mkdir -p "$OUTDIR" || exit 2
OUTDIR=$(cd "$OUTDIR" && pwd)
FILES=(summary.txt tables.md results.jsonl 1-install.log 2-versions.log 3-kernel-tests.log 4-bench.log 5-profile.log)
for f in "${FILES[@]}"; do rm -f "${OUTDIR:?}/$f"; done
SCRATCH=$(mktemp -d)
trap 'rm -rf "$SCRATCH"' EXIT
cd "$ROOT" || exit 2
export PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore PIP_NO_INPUT=1
TRITON_INTERPRET=$([ $DRY = 1 ] && echo 1 || echo 0)  # the dry run interprets; the GPU run compiles
export TRITON_INTERPRET
unset PIP_FIND_LINKS  # only the wheel folder named here
START=$SECONDS FAILED=0
MODE=$([ $DRY = 1 ] && echo "DRY RUN (no GPU: CPU parts only, timings meaningless)" || echo "GPU run")
# the device copy of the tree may have no .git: then GPU_CHECK_COMMIT, or what gpu_wheels.sh recorded
COMMIT=$(git describe --always --dirty 2>/dev/null || echo "${GPU_CHECK_COMMIT:-$(cat "$WHEELS/commit.txt" 2>/dev/null \
    || echo unknown)} (no git metadata here)")
{
    echo "gpu_check.sh: $MODE; $(date -u '+%Y-%m-%d %H:%M UTC'); commit $COMMIT; budget ${BUDGET}s"
    printf '%-5s %-26s %7s  %-19s %s\n' step part seconds log status
} >"$OUTDIR/summary.txt"
echo "# gpu_check.sh: $MODE, commit $COMMIT" >"$OUTDIR/tables.md"
: >"$OUTDIR/results.jsonl"

selected() { [[ ,$STEPS, == *,$1,* ]]; }
record() {  # STEP PART STATUS SECONDS LOG
    printf '%-5s %-26s %7s  %-19s %s\n' "$1" "$2" "$4" "$5" "$3" >>"$OUTDIR/summary.txt"
    echo "[gpu_check] step $1 $2: $3 (${4}s)" >&2
}
# The least each step needs (GPU run; the dry run's steps are slower but its budget is the same): a part is cut
# short so that what the selected steps after it need stays in the budget.
MIN_SECONDS=(0 15 10 60 120 70)
later() {  # STEP: seconds kept for the selected steps after STEP
    local s sum=0
    for s in 1 2 3 4 5; do [ "$s" -gt "$1" ] && selected "$s" && sum=$((sum + MIN_SECONDS[s])); done
    echo $sum
}
# part STEP NAME LOG WANT RESERVE -- CMD...: run CMD (output appended to LOG) under a time limit of WANT
# seconds, cut so that RESERVE seconds stay for the rest of its step and later() for the steps after it;
# record its status. With PART_STDOUT=FILE, CMD's stdout goes to FILE; with EXPECT_RC=N, exit N is a pass.
part() {
    local step=$1 name=$2 log=$3 want=$4 reserve=$5; shift 6
    local left=$((BUDGET - (SECONDS - START) - reserve - $(later "$step"))) limit=$want
    [ "$left" -lt "$limit" ] && limit=$left
    if [ "$limit" -lt 5 ]; then
        record "$step" "$name" "skipped: the time budget is spent" 0 "$log"
        echo "=== $name: skipped, budget spent" >>"$OUTDIR/$log"
        FAILED=$((FAILED + 1))
        return 124
    fi
    echo "=== $name (limit ${limit}s): $*" >>"$OUTDIR/$log"
    local t0=$SECONDS rc
    timeout -k 10 "$limit" "$@" >>"${PART_STDOUT:-$OUTDIR/$log}" 2>>"$OUTDIR/$log"
    rc=$?
    local secs=$((SECONDS - t0)) status
    [ "$rc" = "${EXPECT_RC:-0}" ] && [ "$rc" != 0 ] && status="ok (exit $rc, as expected here)" rc=0
    case $rc in
        0) status=${status:-ok} ;;
        124|137) status="TIMEOUT after ${limit}s" ;;
        *) status="FAILED (exit $rc)" ;;
    esac
    [ $rc = 0 ] || FAILED=$((FAILED + 1))
    echo "=== $name: $status in ${secs}s" >>"$OUTDIR/$log"
    record "$step" "$name" "$status" "$secs" "$log"
    return $rc
}
skip() {  # STEP NAME LOG REASON
    record "$1" "$2" "skipped: $4" 0 "$3"
    echo "=== $2: skipped: $4" >>"$OUTDIR/$3"
}
# jsonl PART FILE: append FILE's JSON as one line {"part": PART, ...} to results.jsonl (partial files too)
jsonl() { [ -s "$2" ] && "$PY" benchmarks/gpu_check_tools.py jsonl "$1" "$2" "$OUTDIR/results.jsonl"; }

# ------------------------------------------------------------------------------------------------ 1. install
step_install() {
    local log=1-install.log site=()
    "$PY" - >>"$OUTDIR/$log" 2>&1 <<'PY'
import sys
print("python", sys.version.split()[0], "at", sys.executable)
for name in ("pip", "setuptools", "wheel", "torch", "triton"):
    try:
        module = __import__(name)
        print(f"{name} {getattr(module, '__version__', '?')} at {module.__file__}")
    except ImportError:
        print(f"{name}: not installed")
    except Exception as e:  # e.g. setuptools' distutils hack asserting after pip imported the stdlib's distutils
        print(f"{name}: import failed ({type(e).__name__}: {e})")
PY
    "$PY" -c 'import torch; print(torch.__version__, torch.__file__)' >"$SCRATCH/torch-before" 2>&1
    if [ $DRY = 1 ]; then site=(--target "$SCRATCH/site"); fi
    if [ ! -f "$WHEELS/requirements.txt" ]; then
        skip 1 wheels "$log" "no $WHEELS/requirements.txt: run benchmarks/gpu_wheels.sh first"
    else
        "$PY" benchmarks/gpu_check_tools.py wheels "$WHEELS" >>"$OUTDIR/$log" 2>&1
        part 1 wheels "$log" 120 20 -- "$PY" -m pip install --no-deps --no-index --no-cache-dir --find-links "$WHEELS" \
            "${site[@]}" -r "$WHEELS/requirements.txt"
    fi
    if ! "$PY" -c 'try:
    import setuptools.command.bdist_wheel
except ImportError:
    import wheel.bdist_wheel' 2>/dev/null; then
        skip 1 project "$log" "this python cannot build a wheel offline (setuptools without bdist_wheel)"
    elif [ $DRY = 1 ]; then  # pip resolves and builds the editable metadata, installs nothing
        part 1 project "$log" 120 10 -- "$PY" -m pip install --dry-run --no-deps --no-index --no-build-isolation -e "$ROOT"
    else
        part 1 project "$log" 120 10 -- "$PY" -m pip install --no-deps --no-index --no-build-isolation -e "$ROOT"
    fi
    "$PY" -c 'import torch; print(torch.__version__, torch.__file__)' >"$SCRATCH/torch-after" 2>&1
    if cmp -s "$SCRATCH/torch-before" "$SCRATCH/torch-after"; then
        echo "torch untouched: $(cat "$SCRATCH/torch-after")" >>"$OUTDIR/$log"
    else
        echo "TORCH CHANGED: before $(cat "$SCRATCH/torch-before"), after $(cat "$SCRATCH/torch-after")" >>"$OUTDIR/$log"
        record 1 torch-untouched "FAILED (the install replaced torch)" 0 "$log"
        FAILED=$((FAILED + 1))
    fi
    # what steps 3-5 import; the dry run looks in the scratch target too
    local path=${PYTHONPATH:-}
    [ $DRY = 1 ] && path=$SCRATCH/site${path:+:$path}
    PYTHONPATH=$path part 1 imports "$log" 60 0 -- "$PY" benchmarks/gpu_check_tools.py imports
}

# ------------------------------------------------------------------------------------------------ 2. versions
step_versions() {
    local log=2-versions.log
    if command -v nvidia-smi >/dev/null; then
        part 2 nvidia-smi "$log" 30 5 -- nvidia-smi
    else
        skip 2 nvidia-smi "$log" "nvidia-smi is not on the PATH"
    fi
    part 2 versions "$log" 60 0 -- "$PY" benchmarks/gpu_check_tools.py versions "$OUTDIR/tables.md"
}

# ------------------------------------------------------------------------------------------- 3. kernel tests
step_tests() {
    local log=3-kernel-tests.log
    if [ $DRY = 1 ]; then  # the interpreted kernel suite; the `gpu` tests report their skip reason
        part 3 kernel-tests "$log" 300 0 -- "$PY" -m pytest -q -rfEs -p no:cacheprovider tests/kernels
    else  # compiled for the GPU: the kernel, the implicit-GEMM conv, sparsify_ measured on CUDA
        part 3 kernel-tests "$log" 110 0 -- "$PY" -m pytest -q -rfEs -p no:cacheprovider -m gpu tests/kernels
    fi
}

# ------------------------------------------------------------------------------------------------- 4. bench
bench_part() {  # NAME WANT RESERVE ARGS...
    local name=$1 want=$2 reserve=$3 json=$SCRATCH/$1.json; shift 3
    part 4 "$name" 4-bench.log "$want" "$reserve" -- "$PY" benchmarks/bench_spmm.py --out "$json" "$@"
    if [ -s "$json" ]; then
        "$PY" benchmarks/spmm_tables.py "$json" >>"$OUTDIR/tables.md" 2>>"$OUTDIR/4-bench.log"
        jsonl "bench-$name" "$json"
    fi
}
step_bench() {
    echo -e "\n## SpMM, convolution and ResNet-18 (benchmarks/bench_spmm.py)\n" >>"$OUTDIR/tables.md"
    if [ $DRY = 1 ]; then
        bench_part spmm-dry 240 30 --dry-run --no-conv
        bench_part conv-dry 120 0 --dry-run --no-layers
        return
    fi
    local shapes=(--shapes "resnet18 fc head" "1024->1024" "layer4" "resnet50") timing=(--warmup-ms 5 --rep-ms 25)
    local grid=(--rows 1 8 16 64 --sparsities 0.5 0.7 0.8 0.9 0.95 --encodings bitmap index --no-conv --no-e2e)
    bench_part spmm-float16 110 85 --dtypes float16 "${shapes[@]}" "${grid[@]}" "${timing[@]}"
    bench_part conv 60 55 --no-layers --no-e2e --dtypes float16 bfloat16 --conv-sparsities 0.7 0.9 "${timing[@]}"
    bench_part spmm-bfloat16 80 25 --dtypes bfloat16 "${shapes[@]}" "${grid[@]}" "${timing[@]}"
    bench_part e2e-resnet18-224 45 0 --no-layers --no-conv --e2e-size 224 --dtypes float16 "${timing[@]}"
}

# ----------------------------------------------------------------------------------------------- 5. profile
step_profile() {
    local log=5-profile.log dir=$SCRATCH/profile model device backends warm
    if [ $DRY = 1 ]; then model=lenet5 device=cpu warm=(--warmup 2 --iters 5 --threads 1)
    else model=resnet18 device=cuda warm=(--warmup 20 --iters 100); fi
    backends=(torch torch-sparse)
    mkdir -p "$dir"
    # Latency does not depend on accuracy: one epoch of training makes real checkpoints fast.
    part 5 train-student "$log" 90 50 -- "$PY" -m kdexport.cli train --model "$model" --epochs 1 --recipe cosine \
        --out "$dir/student.pt" --device "$device" --seed 0 || return
    for amount in 0.70 0.90; do
        part 5 "prune-weight-$amount" "$log" 45 35 -- "$PY" -m kdexport.cli prune "$dir/student.pt" --method weight \
            --amount "$amount" --out "$dir" --device "$device"
    done
    PART_STDOUT=$dir/profile-0.00-torch.json part 5 profile-unpruned-torch "$log" 40 30 -- "$PY" -m kdexport.cli \
        profile "$dir/student.pt" --backend torch --device "$device" --batch 1,32 "${warm[@]}" --json
    for amount in 0.70 0.90; do
        for backend in "${backends[@]}"; do  # interleaved, one after the other: the ratios come from one run
            local expect=0
            # without a GPU torch-sparse must be refused: exit 2 and one line naming what is missing (in the log)
            [ $DRY = 1 ] && [ "$backend" = torch-sparse ] && expect=2
            EXPECT_RC=$expect PART_STDOUT=$dir/profile-$amount-$backend.json part 5 "profile-$amount-$backend" "$log" \
                60 10 -- "$PY" -m kdexport.cli profile "$dir/weight-$amount.pt" --backend "$backend" --device "$device" \
                --batch 1,32 "${warm[@]}" --json
        done
    done
    for json in "$dir"/profile-*.json; do [ -s "$json" ] && jsonl "profile-$(basename "$json" .json)" "$json"; done
    "$PY" benchmarks/gpu_check_tools.py profile-table --model "$model" "$dir"/profile-*.json >>"$OUTDIR/tables.md" \
        2>>"$OUTDIR/$log" || record 5 table "FAILED (gpu_check_tools.py profile-table)" 0 "$log"
}

selected 1 && step_install
selected 2 && step_versions
selected 3 && step_tests
selected 4 && step_bench
selected 5 && step_profile
for s in 1 2 3 4 5; do selected $s || record $s - "not selected (--steps $STEPS)" 0 -; done
echo "total: $((SECONDS - START))s of a ${BUDGET}s budget; $FAILED parts failed, timed out or were cut" \
    >>"$OUTDIR/summary.txt"
cat "$OUTDIR/summary.txt"
[ $FAILED = 0 ]

#!/usr/bin/env bash
# One prepared GPU check, for a lent GPU machine: run from the repository root,
#
#     bash bench/gpu_check.sh                  # the default parts, each bounded in time
#     bash bench/gpu_check.sh study tests      # only these parts (and env); names as below
#
# Parts: tests seed eager ceiling concurrency concurrency_graph streams mps study_mps (the
# default), and study (whole trials K at a time without MPS: by name only).
#
# It needs no install and no network: the machine's python3 already has torch, torchvision,
# numpy, pillow, pyarrow and pytest, which is all that study.train and the bench import (Ray
# is not needed: the trials are run by study.train.run_trial directly), so the repository is
# used from PYTHONPATH. Each part runs under its own `timeout`; a part that fails or times out
# shows as "failed" and the table is printed anyway, at the end, and written to
# $OUT/gpu_check.txt when $OUT is set (with the parts' logs in $OUT/gpu_check.log).
#
# Dry run of the whole script on a machine without a GPU:
#     GPU_BENCH_ARGS="--device cpu --quick" PYTHON=.venv/bin/python bash bench/gpu_check.sh
set -u
cd "$(dirname "$0")/.."
ROOT=$PWD
WORK=$(mktemp -d /tmp/gpu_check.XXXXXX)
LOG=$WORK/gpu_check.log
ARGS=${GPU_BENCH_ARGS:-}
DEFAULT="tests seed eager ceiling concurrency concurrency_graph streams mps study_mps"
ALL="$DEFAULT study"
ASKED=" ${*:-$DEFAULT} "
for p in $ASKED; do
    case " $ALL " in *" $p "*) ;; *) echo "gpu_check: no part '$p' (parts: $ALL)"; exit 2;; esac
done
want() { case "$ASKED" in *" $1 "*) return 0;; esac; return 1; }
T0=$(date +%s)

# ---- which python: one that imports what we need (the image's python3 holds torch)
PY=""
for cand in ${PYTHON:-} python3 /opt/torch/.venv/bin/python3 python; do
    if command -v "$cand" >/dev/null 2>&1 &&
        "$cand" -c "import torch, torchvision, numpy, PIL, pyarrow" >/dev/null 2>&1; then
        PY=$cand
        break
    fi
done
if [ -z "$PY" ]; then
    echo "gpu_check: no python with torch, torchvision, numpy, pillow and pyarrow found" | tee "$LOG"
    [ -n "${OUT:-}" ] && cp "$LOG" "$OUT/"
    exit 1
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
{
    echo "== setup: $(command -v "$PY") $("$PY" --version 2>&1)"
    "$PY" -c "import torch, torchvision, PIL, numpy, pyarrow; print('torch', torch.__version__, \
'cuda', torch.version.cuda, 'available', torch.cuda.is_available(), '| torchvision', \
torchvision.__version__, '| pillow', PIL.__version__, '| numpy', numpy.__version__, \
'| pyarrow', pyarrow.__version__)"
    "$PY" -c "import pytest; print('pytest', pytest.__version__)" || echo "pytest missing"
    command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm \
        --format=csv,noheader
    "$PY" -c "import study.train" && echo "study.train imports"
} 2>&1 | tee -a "$LOG"

# ---- the parts, each bounded: the default parts' limits add up to 600 s (a device call's limit)
part() {  # part NAME SECONDS
    local name=$1 limit=$2 start rc
    want "$name" || [ "$name" = env ] || return 0
    start=$(date +%s)
    echo "== $name (limit ${limit}s)" | tee -a "$LOG"
    timeout -k 10 "$limit" "$PY" bench/gpu_bench.py "$name" $ARGS --json "$WORK/$name.json" \
        >>"$LOG" 2>&1
    rc=$?
    echo "   $name: exit $rc, $(( $(date +%s) - start ))s" | tee -a "$LOG"
    [ $rc -ne 0 ] && tail -n 15 "$LOG" | sed 's/^/   | /'
}
# most telling first: whether graphs give the eager numbers, then one trial's speed
part env 20
if want tests; then
    echo "== tests/test_gpu.py, CUDA cases of test_stats.py (limit 45s)" | tee -a "$LOG"
    timeout -k 10 45 "$PY" -m pytest -q -p no:cacheprovider --junitxml="$WORK/test_gpu.xml" tests/test_gpu.py tests/test_stats.py -k "test_gpu or cuda" \
        >"$WORK/test_gpu.txt" 2>&1
    echo $? >"$WORK/test_gpu.rc"
    cat "$WORK/test_gpu.txt" >>"$LOG"
    tail -n 3 "$WORK/test_gpu.txt" | sed 's/^/   | /'
fi
part seed 45
part eager 75
part ceiling 30
part concurrency 65
part concurrency_graph 70
part streams 40
part study 200
# last: these run NVIDIA's MPS daemon (for their own workers only) and stop it
part mps 60
part study_mps 150

# ---- the table
{
    echo
    echo "$ASKED" >"$WORK/asked.txt"
    if ! "$PY" bench/gpu_bench.py table "$WORK" 2>&1; then
        echo "(table failed; raw results:)"
        for f in "$WORK"/*.json; do [ -e "$f" ] && echo "$(basename "$f"): $(cat "$f")"; done
    fi
    echo "total $(( $(date +%s) - T0 ))s"
} | tee "$WORK/gpu_check.txt"

if [ -n "${OUT:-}" ]; then
    cp "$WORK/gpu_check.txt" "$WORK/gpu_check.log" "$OUT/" 2>/dev/null
    cp "$WORK/test_gpu.xml" "$OUT/" 2>/dev/null
    "$PY" -c 'import json, pathlib, sys; print(json.dumps({p.stem: json.loads(p.read_text())
        for p in sorted(pathlib.Path(sys.argv[1]).glob("*.json"))}, indent=1))' "$WORK" >"$OUT/gpu_check.json"
fi
exit 0

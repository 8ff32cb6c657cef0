#!/usr/bin/env bash
# The lent GPU machine's one command (benchmarks/README.md, "GPU check"): install the carried wheels, then run
# benchmarks/gpu_check.py within the 8 minutes the check may take, install included.
#   bash benchmarks/gpu_check.sh .whl                   # on the device machine; the JSON goes to $OUT/gpu_check.json
#   bash benchmarks/gpu_check.sh .whl --only fsdp2      # gpu_check.py's options follow the wheel folder
# PLAN_ONLY=1 checks the wheel folder's parts without installing (tests/test_gpu_check.py runs it so, with --dry-run).
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS=${1:?usage: gpu_check.sh WHEEL_FOLDER [gpu_check.py options]}
shift
PYTHON=${PYTHON:-python3}  # the device's python3 holds its torch
SITE=${SITE:-/tmp/site}
TOTAL_S=${TOTAL_S:-480}
start=$(date +%s)
"$PYTHON" scripts/gpu_wheels.py install "$WHEELS" --target "$SITE" ${PLAN_ONLY:+--plan}
export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
spent=$(( $(date +%s) - start ))
echo "gpu_check.sh: wheels ready in ${spent} s"
# What is left of the 8 minutes, less 15 s to write and hand back; options given after the folder still win.
exec "$PYTHON" benchmarks/gpu_check.py --budget-s $(( TOTAL_S - spent - 15 )) --out "${OUT:-outputs}/gpu_check.json" "$@"

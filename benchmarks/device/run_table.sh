#!/usr/bin/env bash
# The one command for a GPU machine of this workplace's device tool (build .devcarry first with
# benchmarks/device/build_carry.sh; carry it):
#
#   run(command="bash .devcarry/run.sh", carry=[".devcarry"], timeout_s=570)
#
# Phase 1: the video table at the curves' budget (benchmarks/table_gpu.sh: bf16, TABLE_JOBS runs
# side by side). Phase 2, if under 400 s have passed: the image set's training curves on the GPU.
# Everything under benchmarks/results/table_gpu*/ comes back as $OUT/results.tgz (the tool returns
# at most 8 files, 2 folders deep), beside the logs and a GPU-utilisation trace.
set -u -o pipefail
T0=$(date +%s)
mkdir -p /tmp/avsite && tar -xJf .devcarry/av-slim.tar.xz -C /tmp/avsite || exit 2
export PYTHONPATH=/tmp/avsite XMODAL_WHEELHOUSE=.devcarry TABLE_JOBS=${TABLE_JOBS:-14}
# once for both phases: installs the wheels and exports PYTHONPATH, so table_gpu.sh finds them there
source benchmarks/gpu_env.sh || exit 2
(while sleep 5; do
    echo "$(( $(date +%s) - T0 )) $(nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader)"
 done) > "$OUT/smi.txt" 2>&1 &
SMI=$!
TABLE_BUDGET_S=300 TABLE_TIMEOUT_S=400 bash benchmarks/table_gpu.sh 2>&1 | tee "$OUT/table_log.txt"
echo "phase 1 rc=$? at $(( $(date +%s) - T0 )) s"
EL=$(( $(date +%s) - T0 ))
if [ "$EL" -lt 400 ]; then
    timeout --signal=TERM --kill-after=15 $(( 505 - EL )) "$PY" benchmarks/table.py --curves --sets image \
        --curve-epochs 15 --device cuda --precision bf16 --jobs "$TABLE_JOBS" --budget-s $(( 450 - EL )) \
        --work /tmp/xmodal-table-work --out benchmarks/results/table_gpu_image 2>&1 | tee "$OUT/curves_log.txt"
    echo "phase 2 rc=$? at $(( $(date +%s) - T0 )) s"
fi
kill "$SMI" 2>/dev/null
(cd benchmarks/results && tar -czf "$OUT/results.tgz" $(ls -d table_gpu table_gpu_image 2>/dev/null))
ls -la "$OUT"
echo "total $(( $(date +%s) - T0 )) s"

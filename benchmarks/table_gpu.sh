#!/usr/bin/env bash
# The results table on one GPU: issue 14's target is within 8 minutes on one H100-class card.
#
#   bash benchmarks/table_gpu.sh [table.py options]       # later options override the ones below
#
# table.py at the budget read off the committed training curves (benchmarks/results/table/
# curves.json), on CUDA in bf16, TABLE_JOBS runs side by side on the one card (default: 3/4 of
# the CPU cores), into benchmarks/results/table_gpu/ (beside the CPU table, never mixed with it:
# the protocols differ: no frozen-prefix cache on CUDA). No new run starts after TABLE_BUDGET_S (default 330 s);
# TABLE_TIMEOUT_S (default 470 s) caps the whole command. Rerunning resumes: finished runs keep
# their records.
set -u -o pipefail
source "$(dirname "$0")/gpu_env.sh" || exit 2

JOBS="${TABLE_JOBS:-$(( $(nproc) * 3 / 4 ))}"
timeout --signal=TERM --kill-after=20 "${TABLE_TIMEOUT_S:-470}" "$PY" benchmarks/table.py \
    --budget-from benchmarks/results/table/curves.json --sets video --device cuda --precision bf16 \
    --jobs "$JOBS" --budget-s "${TABLE_BUDGET_S:-330}" --work "${TABLE_WORK:-/tmp/xmodal-table-work}" \
    --out benchmarks/results/table_gpu "$@"
rc=$?
if [ "$rc" -eq 124 ]; then
    echo "table_gpu: stopped at TABLE_TIMEOUT_S=${TABLE_TIMEOUT_S:-470}; finished runs are in benchmarks/results/table_gpu/records" >&2
fi
exit "$rc"

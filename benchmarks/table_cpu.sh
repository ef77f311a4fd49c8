#!/usr/bin/env bash
# The claims table on a 2-core CPU: issue 14's target is within 2 hours on this project's machine.
#
#   bash benchmarks/table_cpu.sh [table.py options]       # later options override the ones below
#
# table.py with each method trained to its own loss plateau in the committed curves
# (--budget-from benchmarks/results/table/curves.json), on the video set: the seven claim methods
# and the four ablation settings the claims compare (--ablations claims), 3 seeds each, so that
# C1-C5 get their verdicts. bf16 autocast (0.66-0.84x of the fp32 step on a CPU with AMX; without
# AMX pass --precision fp32), two runs side by side with one thread each (--jobs 2 --threads 1),
# the frozen-prefix cache for the methods that allow it. Into benchmarks/results/table_cpu/,
# beside the GPU table, never mixed with it (the protocols differ). Rerunning resumes: finished
# runs keep their records. `--methods all` adds the ten secondary methods (one seed each);
# `--methods all --ablations all --sets video,image` is the full table.
set -u -o pipefail
cd "$(dirname "$0")/.." || exit 2
PY="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}"
exec "$PY" benchmarks/table.py --budget-from benchmarks/results/table/curves.json --sets video \
    --methods full_finetune,partial,projection,uni_adapter,cross_modal_adapter,mv_adapter,msta \
    --ablations claims --device cpu --precision bf16 --jobs 2 --threads 1 --cache-frozen-prefix --no-speed \
    --out benchmarks/results/table_cpu "$@"

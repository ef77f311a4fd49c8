#!/usr/bin/env bash
# The GPU suite (benchmarks/GPU.md): one command on a bare GPU machine with PyTorch installed.
#
#   bash benchmarks/gpu_suite.sh [gpu_suite.py options]      # e.g. --with-table, --budget-s 400
#
# - gpu_env.sh makes xmodal importable from this checkout, installing missing packages from a
#   wheelhouse (never over the machine's own torch).
# - The whole run is capped by `timeout` (SUITE_TIMEOUT_S, default 470 s < 8 minutes); the
#   JSON is rewritten after every section, so a capped run keeps what it measured.
set -u -o pipefail
source "$(dirname "$0")/gpu_env.sh" || exit 2

timeout --signal=TERM --kill-after=10 "${SUITE_TIMEOUT_S:-470}" "$PY" benchmarks/gpu_suite.py "$@"
rc=$?
if [ "$rc" -eq 124 ]; then
    echo "gpu_suite: stopped at SUITE_TIMEOUT_S=${SUITE_TIMEOUT_S:-470}; the JSON holds the sections finished before" >&2
fi
exit "$rc"

#!/usr/bin/env bash
# The GPU suite (benchmarks/GPU.md): one command on a bare GPU machine with PyTorch installed.
#
#   bash benchmarks/gpu_suite.sh [gpu_suite.py options]      # e.g. --with-table, --budget-s 400
#
# - xmodal runs from this checkout (PYTHONPATH=src): nothing is pip-installed over the
#   machine's own torch.
# - Python packages xmodal needs that the machine lacks (open_clip_torch, ftfy, wcwidth, av)
#   are installed with --no-index --no-deps from a wheelhouse folder, XMODAL_WHEELHOUSE or
#   ./.whl (GPU.md has the `pip download` command that fills it), into /tmp/xmodal-site.
# - The whole run is capped by `timeout` (SUITE_TIMEOUT_S, default 470 s < 8 minutes); the
#   JSON is rewritten after every section, so a capped run keeps what it measured.
set -u -o pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
WHEELHOUSE="${XMODAL_WHEELHOUSE:-.whl}"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1

if ! "$PY" -c "import torch" 2>/dev/null; then
    echo "gpu_suite: no PyTorch in $PY; this suite expects a machine with torch preinstalled" >&2
    exit 2
fi
if ! "$PY" -c "import open_clip, ftfy, av" 2>/dev/null; then
    if ls "$WHEELHOUSE"/*.whl >/dev/null 2>&1; then
        # never torch: --no-deps installs exactly the wheels in the folder, nothing they depend on
        "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target /tmp/xmodal-site "$WHEELHOUSE"/*.whl || { echo "gpu_suite: installing $WHEELHOUSE failed" >&2; exit 2; }
        export PYTHONPATH="$PYTHONPATH:/tmp/xmodal-site"
    else
        echo "gpu_suite: open_clip/ftfy/av missing and no wheels in $WHEELHOUSE (see benchmarks/GPU.md)" >&2
        exit 2
    fi
fi
"$PY" -c "import open_clip, xmodal.engine.train" || { echo "gpu_suite: xmodal does not import" >&2; exit 2; }
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>/dev/null || true

timeout --signal=TERM --kill-after=10 "${SUITE_TIMEOUT_S:-470}" "$PY" benchmarks/gpu_suite.py "$@"
rc=$?
if [ "$rc" -eq 124 ]; then
    echo "gpu_suite: stopped at SUITE_TIMEOUT_S=${SUITE_TIMEOUT_S:-470}; the JSON holds the sections finished before" >&2
fi
exit "$rc"

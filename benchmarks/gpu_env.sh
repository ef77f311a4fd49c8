# Sourced by the GPU scripts (gpu_suite.sh, table_gpu.sh): make xmodal importable on a bare GPU
# machine with PyTorch installed, without pip-installing anything over the machine's own torch.
#
# - xmodal runs from this checkout (PYTHONPATH=src).
# - Python packages xmodal needs that the machine lacks (open_clip_torch, ftfy, wcwidth, av) are
#   installed with --no-index --no-deps from a wheelhouse folder, XMODAL_WHEELHOUSE or ./.whl
#   (benchmarks/GPU.md has the `pip download` command that fills it), into /tmp/xmodal-site.
# Returns 2 (the caller exits with it) when that is not possible.
cd "$(dirname "${BASH_SOURCE[0]}")/.." || return 2
PY="${PYTHON:-python3}"
WHEELHOUSE="${XMODAL_WHEELHOUSE:-.whl}"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1

if ! "$PY" -c "import torch" 2>/dev/null; then
    echo "gpu_env: no PyTorch in $PY; the GPU scripts expect a machine with torch preinstalled" >&2
    return 2
fi
if ! "$PY" -c "import open_clip, ftfy, av" 2>/dev/null; then
    if ls "$WHEELHOUSE"/*.whl >/dev/null 2>&1; then
        # never torch: --no-deps installs exactly the wheels in the folder, nothing they depend on
        "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target /tmp/xmodal-site "$WHEELHOUSE"/*.whl || { echo "gpu_env: installing $WHEELHOUSE failed" >&2; return 2; }
        export PYTHONPATH="$PYTHONPATH:/tmp/xmodal-site"
    else
        echo "gpu_env: open_clip/ftfy/av missing and no wheels in $WHEELHOUSE (see benchmarks/GPU.md)" >&2
        return 2
    fi
fi
"$PY" -c "import open_clip, av, xmodal.engine.train" || { echo "gpu_env: xmodal does not import" >&2; return 2; }
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>/dev/null || true

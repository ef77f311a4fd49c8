#!/usr/bin/env bash
# Build .devcarry/: what a GPU machine of this workplace's device tool needs for the table, in
# under its 64 MiB working-tree limit (the tracked tree is ~48 MB, 45 of them xmodal-tiny's weights).
#
#   bash benchmarks/device/build_carry.sh          # needs pip access to PyPI and gcc
#
# - .devcarry/*.whl: open_clip_torch, ftfy, wcwidth for the machine's Python 3.12 (the image has
#   torch, numpy, safetensors, timm, ... already; see benchmarks/GPU.md).
# - .devcarry/av-slim.tar.xz: PyAV 18.1.0 (36 MB as a wheel) cut to ~13 MB: debug info stripped
#   from its Cython modules, and the bundled libraries of codecs and protocols the generated world
#   never uses (x265, SVT-AV1, VP8/9, dav1d, GnuTLS) replaced by stubs exporting the same symbols.
#   The world is written with libx264 and read with FFmpeg's own H.264 decoder, which stay intact:
#   check_slim_av below writes and decodes a small world with it and with the full PyAV and
#   compares the bytes. Never use this PyAV for anything else.
# - .devcarry/run.sh: the one device command (benchmarks/device/run_table.sh).
set -euo pipefail
cd "$(dirname "$0")/../.."
grep -qx "/.devcarry/" .git/info/exclude 2>/dev/null || echo "/.devcarry/" >> .git/info/exclude
rm -rf .devcarry && mkdir -p .devcarry
PLAT=(--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${PLAT[@]}" \
    -d .devcarry open_clip_torch==3.3.0 ftfy==6.3.1 wcwidth==0.9.4
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${PLAT[@]}" \
    -d "$WORK" av==18.1.0
(cd "$WORK" && mkdir w && cd w && unzip -q ../av-*.whl)
W="$WORK/w"
find "$W/av" -name "*.so" -exec strip --strip-debug {} +

stub() {  # replace bundled library $1 by a stub that defines every symbol the others import from it
    local lib=$1 src="$WORK/$1.c" map="$WORK/$1.map"
    local importers=()
    for u in "$W"/av.libs/*.so* $(find "$W/av" -name "*.so"); do
        [ "$(basename "$u")" = "$lib" ] && continue
        readelf -d "$u" | grep -q "\[$lib\]" && importers+=("$u")
    done
    for u in "${importers[@]}"; do nm -D --undefined-only "$u" | awk '{print $2}' | sed 's/@.*//'; done | sort -u > "$WORK/und"
    nm -D --defined-only "$W/av.libs/$lib" | awk '{print $3, $2}' | sed 's/@@*/ /' \
        | awk '{print $1, $NF, (NF==3 ? $2 : "-")}' | sort -u > "$WORK/def"   # name type version
    join "$WORK/def" "$WORK/und" > "$WORK/pick"
    awk '{ if ($2=="T"||$2=="W"||$2=="i") print "int "$1"(void){return -1;}"; else print "char "$1"[256];" }' \
        "$WORK/pick" > "$src"
    local vs=()
    if awk '$3!="-"' "$WORK/pick" | grep -q .; then  # versioned symbols (GnuTLS): the same versions
        awk '$3!="-" {v[$3]=v[$3] " " $1 ";"} END {for (k in v) print k " { global:" v[k] " };"}' "$WORK/pick" > "$map"
        vs=(-Wl,--version-script="$map")
    fi
    gcc -shared -fPIC -O2 -o "$W/av.libs/$lib" -Wl,-soname,"$lib" "${vs[@]}" "$src"
    echo "stubbed $lib ($(wc -l < "$src") symbols)"
}
for pattern in libx265 libSvtAv1Enc libgnutls libvpx libdav1d; do
    stub "$(basename "$(ls "$W"/av.libs/${pattern}-*)")"
done
for pass in 1 2 3; do  # drop what nothing loads any more (GnuTLS's own dependencies)
    for l in "$W"/av.libs/*; do
        n=$(basename "$l"); used=0
        for u in "$W"/av.libs/*.so* $(find "$W/av" -name "*.so"); do
            [ "$(basename "$u")" = "$n" ] && continue
            readelf -d "$u" | grep -q "\[$n\]" && { used=1; break; }
        done
        [ "$used" = 0 ] && rm "$l" && echo "dropped $n"
    done
done
tar -C "$W" -cJf .devcarry/av-slim.tar.xz av av.libs av-18.1.0.dist-info
cp benchmarks/device/run_table.sh .devcarry/run.sh

# check_slim_av: the slim PyAV writes and reads a small world byte for byte like the full one
mkdir -p "$WORK/site" && tar -xJf .devcarry/av-slim.tar.xz -C "$WORK/site"
PY="${PYTHON:-.venv/bin/python}"
check='import hashlib, sys; from pathlib import Path
from xmodal.synth.world import write_video_set, read_jsonl
from xmodal.data.frame_cache import extract_frames
root = Path(sys.argv[1]); write_video_set(root / "d", n=24, n_test=8, n_order=4, seed=0)
items = [{"id": r["id"], "media": str(root / "d" / r["video"])} for s in ("train", "test", "test_order")
         for r in read_jsonl(root / "d" / f"{s}.jsonl")]
extract_frames(items, root / "f", fps=1.0, fmt="npy", size=0, progress=False, bench_clips=0)
h = hashlib.sha256()
for p in sorted((root / "d").rglob("*.mp4")) + sorted((root / "f").rglob("*.npy")): h.update(p.read_bytes())
import av; print(av.__file__, h.hexdigest())'
slim=$(PYTHONPATH="$WORK/site:src" "$PY" -c "$check" "$WORK/slim" 2>/dev/null | tail -1)
full=$(PYTHONPATH=src "$PY" -c "$check" "$WORK/full" 2>/dev/null | tail -1)
echo "slim: $slim"; echo "full: $full"
case "$slim" in "$WORK/site/"*) ;; *) echo "build_carry: the slim PyAV was not the one imported" >&2; exit 1;; esac
[ "${slim##* }" = "${full##* }" ] || { echo "build_carry: the slim PyAV writes or reads the world differently" >&2; exit 1; }
du -sh .devcarry; echo "tracked tree: $(git ls-files -z | xargs -0 du -cb | tail -1 | cut -f1) bytes; limit 67108864"

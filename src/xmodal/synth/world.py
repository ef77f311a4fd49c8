"""Dataset writers for the generated world: real PNG/MP4 files plus plain-JSONL annotations.

Three sets:
- `write_image_corpus`: the pretraining image-caption corpus (1-3 objects on plain dark
  backgrounds, attribute captions). Held-out scenes never occur in training.
- `write_video_set`: the downstream video-text world, shifted from pretraining in look
  (bright/graded/noisy backdrops filmed by an imperfect camera: colour cast, blur, sensor
  noise) and in wording (synonyms); a main test split of distinct stories and a separate
  order subset (`test_order`) of hard-negative groups that differ only in event order.
- `write_shifted_images`: image-text retrieval under shift (new backgrounds, synonyms and
  sentence frames, several captions per image), train/test.

Every item draws from its own RNG stream `(seed, set, split, index)`, so a set is a pure
function of its arguments. Layout of an output folder:
`train.jsonl`, `test.jsonl` (`{"id", "image"|"video", "captions", ["descriptions"]}`, media
paths relative to the folder), `meta/{split}.jsonl` (the structured scene or story behind each
item, for tests and analysis) and `synth.json` (parameters, counts, timing).

MP4 files are bit-reproducible (generator version 1's were not: ~3 % of clips differed
between runs): RGB -> YUV 4:2:0 is done here in numpy, and x264 runs on one thread with a
constant quantiser instead of crf (see `X264_QP`).
"""

from __future__ import annotations

import io
import json
import os
import time
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image

from xmodal.atomic import atomic_write_bytes, atomic_write_text
from xmodal.errors import XModalError
from xmodal.process_map import process_map
from xmodal.synth import captions as phr
from xmodal.synth import events as ev
from xmodal.synth.camera import film, sample_camera
from xmodal.synth.scenes import (
    CELLS, COLOURS, SHAPES, SHIFTED_BACKGROUNDS, SIZES, TEXTURES, Thing, backdrop_image, contrast_ok,
    dark_background, render, sample_backdrop,
)

#: per set: bumped whenever the same arguments would write different files
#: videos 3: the train split's grouped clips match the test's share of clips (version 2 drew a
#: story as grouped with that share, so two thirds of its training clips were order variants)
GENERATOR_VERSIONS = {"images": 1, "videos": 3, "shifted-images": 1}
_SET_CODES = {"images": 1, "videos": 2, "shifted-images": 3}
_SPLIT_CODES = {"train": 0, "test": 1, "test_order": 2}


# ------------------------------------------------------------------------ file output

def write_jsonl(path: Path, rows: Sequence[dict]) -> None:
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def png_bytes(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


def available_video_codec(preferred: str = "auto") -> str:
    """libx264 when the installed PyAV has it, else mpeg4 (both are in the PyPI av wheels)."""
    import av

    candidates = ["libx264", "mpeg4"] if preferred == "auto" else [preferred]
    for name in candidates:
        try:
            av.codec.Codec(name, "w")
            return name
        except Exception:  # noqa: BLE001 - av raises several types for unknown codecs
            continue
    raise XModalError(f"video codec {preferred!r} is not available in the installed PyAV; expected libx264 or mpeg4")


def rgb_to_yuv420p(frames: np.ndarray) -> np.ndarray:
    """uint8 (T, H, W, 3) RGB -> uint8 (T, H * 3 // 2, W) planar YUV 4:2:0 (BT.601, limited range).

    The matrix decoders assume for untagged H.264; chroma is the mean of each 2x2 block.
    Pure numpy in float64, so the same frames always give the same bytes.
    """
    t, h, w, _ = frames.shape
    if h % 4 or w % 2:
        raise XModalError(f"video frames of {w}x{h}: expected a width divisible by 2 and a height by 4 "
                          "(YUV 4:2:0 planes)")
    f = frames.astype(np.float64)
    r, g, b = f[..., 0], f[..., 1], f[..., 2]
    y = 16.0 + (65.481 * r + 128.553 * g + 24.966 * b) / 255.0
    cb = 128.0 + (-37.797 * r - 74.203 * g + 112.0 * b) / 255.0
    cr = 128.0 + (112.0 * r - 93.786 * g - 18.214 * b) / 255.0

    def half(c: np.ndarray) -> np.ndarray:
        return c.reshape(t, h // 2, 2, w // 2, 2).mean(axis=(2, 4)).reshape(t, h // 4, w)

    planes = np.concatenate([y, half(cb), half(cr)], axis=1)
    return np.clip(np.rint(planes), 0, 255).astype(np.uint8)


#: x264 constant quantiser. Not crf: crf's macroblock-tree rate control made the same frames
#: encode differently from run to run (1 in 4-10 encodes of a noisy clip; pixels off by up to 8
#: levels), because one of x264's assembly routines reads memory whose contents vary; with a
#: constant quantiser (or asm=0, 3x slower) the output is bit-identical. qp 10 is near-lossless.
X264_QP = 10


def mp4_bytes(frames: np.ndarray, fps: float, codec: str = "libx264") -> bytes:
    """Encode uint8 (T, H, W, 3) RGB frames as an MP4 (yuv420p, near-lossless), bit-reproducibly.

    Our own colour conversion (`rgb_to_yuv420p`, no swscale), one encoder thread and a
    constant quantiser (`X264_QP`): the bytes depend on the frames only.
    """
    import av
    from fractions import Fraction

    yuv = rgb_to_yuv420p(frames)
    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as container:
        stream = container.add_stream(codec, rate=Fraction(fps).limit_denominator(1000))
        stream.width, stream.height = int(frames.shape[2]), int(frames.shape[1])
        stream.pix_fmt = "yuv420p"
        if codec == "libx264":
            stream.options = {"qp": str(X264_QP), "preset": "medium",
                              "x264-params": "threads=1:lookahead-threads=1:sliced-threads=0"}
        else:
            stream.options = {"qmin": "1", "qmax": "3"}  # mpeg4 ignores "qscale" through PyAV
        stream.codec_context.thread_count = 1
        stream.codec_context.thread_type = "NONE"
        for plane in yuv:
            for packet in stream.encode(av.VideoFrame.from_ndarray(plane, format="yuv420p")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buf.getvalue()


def _progress(total: int, desc: str, enabled: bool):
    from xmodal.progress import progress

    return progress(total, desc=desc, unit="item", enabled=enabled)


def _rng(seed: int, kind: str, split: str, *index: int) -> np.random.Generator:
    return np.random.default_rng([int(seed), _SET_CODES[kind], _SPLIT_CODES[split], *index])


def _check_sizes(n: int, n_test: int, what: str, n_order: int = 0) -> int:
    if n_test < 1 or n_test >= n:
        raise XModalError(f"--split-test={n_test}: expected 1 <= split-test < --n ({n}) for {what}")
    if n_order < 0 or n_test + n_order >= n:
        raise XModalError(f"--split-order={n_order}: expected 0 <= split-order < --n - --split-test "
                          f"({n - n_test}) for {what}")
    return n - n_test - n_order


# -------------------------------------------------------------------------- scenes
def sample_scene(rng: np.random.Generator, max_objects: int = 3,
                 colours: Optional[Sequence[str]] = None) -> List[Thing]:
    """1..max_objects objects with independent attributes in distinct grid cells."""
    n = int(rng.choice(np.arange(1, max_objects + 1), p=_count_probs(max_objects)))
    cells = rng.permutation(len(CELLS))[:n]
    colours = list(colours or COLOURS)
    return [Thing(SHAPES[int(rng.integers(len(SHAPES)))], colours[int(rng.integers(len(colours)))],
                  list(SIZES)[int(rng.integers(len(SIZES)))], TEXTURES[int(rng.integers(len(TEXTURES)))],
                  CELLS[int(c)]) for c in cells]


def _count_probs(max_objects: int) -> np.ndarray:
    p = np.array([0.3, 0.4, 0.3][:max_objects], dtype=np.float64)
    return p / p.sum()


def scene_key(things: Sequence[Thing]) -> Tuple:
    """What a caption can tell about a scene (attributes and cells), order-free."""
    return tuple(sorted((t.shape, t.colour, t.size, t.texture, tuple(t.cell)) for t in things))


def _jitter(rng: np.random.Generator, n: int) -> List[Tuple[float, float]]:
    return [(float(rng.uniform(-2.5, 2.5)), float(rng.uniform(-2.5, 2.5))) for _ in range(n)]


def _render_scene(things: Sequence[Thing], jitter, background: np.ndarray) -> np.ndarray:
    size = background.shape[0]
    return render([t.to_shape(size, j) for t, j in zip(things, jitter)], background)


# ------------------------------------------------------------------ pretraining corpus
def write_image_corpus(out: str | os.PathLike, n: int = 20000, n_test: int = 1000, seed: int = 0,
                       image_size: int = 64, captions_per_image: int = 2, progress: bool = True,
                       command: Optional[str] = None) -> Dict:
    """The pretraining image-caption corpus: `n` images, `n_test` of them held out in test.jsonl.

    Test scenes are unique within the test split and never occur (as attribute/cell
    combinations) in the training split, so zero-shot retrieval on them is honest.
    """
    n_train = _check_sizes(n, n_test, "images")
    out = Path(out)
    t0 = time.time()
    bar = _progress(n, "synth images", progress)
    test_keys: set = set()

    def items(split: str, count: int) -> Iterator[Tuple[dict, dict]]:
        for i in range(count):
            for attempt in range(1000):
                rng = _rng(seed, "images", split, i, attempt)
                things = sample_scene(rng)
                key = scene_key(things)
                if key not in test_keys:  # train: no held-out scene; test: no duplicate scene
                    break
            else:  # pragma: no cover - 1000 failures would mean a degenerate world
                raise XModalError("images: could not draw a held-out scene; the attribute space is exhausted")
            if split == "test":
                test_keys.add(key)
            jitter = _jitter(rng, len(things))
            background = dark_background(image_size, rng)
            image = _render_scene(things, jitter, background)
            caps = []
            for _ in range(20 * captions_per_image):
                c = phr.image_caption(things, rng)
                if c not in caps:
                    caps.append(c)
                if len(caps) == captions_per_image:
                    break
            item_id = f"{split}-{i:06d}"
            rel = f"images/{split}/{i:06d}.png"
            atomic_write_bytes(out / rel, png_bytes(image))
            bar.update(1)
            yield ({"id": item_id, "image": rel, "captions": caps},
                   {"id": item_id, "objects": [t.to_dict() for t in things], "jitter": jitter,
                    "background": [float(v) for v in background[0, 0]]})

    splits = {}
    for split, count in (("test", n_test), ("train", n_train)):
        rows, meta = zip(*items(split, count)) if count else ((), ())
        splits[split] = (list(rows), list(meta))
    bar.close()
    return _finish(out, "images", splits, t0, command, seed=seed, image_size=image_size,
                   captions_per_image=captions_per_image)


# -------------------------------------------------------------------------- video set
def _target_look(rng: np.random.Generator, events: int, image_size: int):
    """A backdrop, the object colours that stand out on it, and the clip's camera."""
    while True:
        backdrop = sample_backdrop(rng)
        visible = [c for c in COLOURS if contrast_ok(c, backdrop_image(backdrop, image_size))]
        if len(visible) >= 2 * events + 1:  # every actor and every recolour gets its own colour
            return backdrop, visible, sample_camera(rng)


def write_video_set(out: str | os.PathLike, n: int = 900, n_test: int = 200, seed: int = 0, image_size: int = 64,
                    fps: float = 4.0, seconds_per_event: float = 4.0, events: int = 2, group_size: int = 4,
                    captions_train: int = 3, captions_test: int = 1, codec: str = "auto", n_order: int = 0,
                    progress: bool = True, command: Optional[str] = None, workers: Optional[int] = None) -> Dict:
    """The downstream video-text world: `n` clips, `n_test` in test.jsonl, `n_order` in test_order.jsonl.

    Every clip is filmed in the target look (`_target_look`) and captioned in the target
    register. `test` holds distinct stories, as a retrieval benchmark does; `test_order`
    holds groups of up to `group_size` hard negatives (same actors, backdrop and camera;
    events swapped in order and/or one event played backwards) that only time tells apart.
    Training mixes both kinds in the test's proportion of clips (`n_order / (n_test + n_order)`
    of the training clips belong to such groups); a group never straddles a split.
    Each clip lasts `events * seconds_per_event` seconds at `fps`.

    Stories, captions and ids are drawn first, in order, in this process; the clips are then
    filmed and encoded by `workers` processes (default: one per CPU, at most 8). Every clip depends
    on its own story and camera only and is encoded single-threaded, so the files are the same
    bytes whatever the number of workers.
    """
    n_train = _check_sizes(n, n_test, "videos", n_order)
    if not 1 <= events <= 3:
        raise XModalError(f"--events={events}: expected 1, 2 or 3 events per clip")
    if group_size < 1:
        raise XModalError(f"--group-size={group_size}: expected >= 1")
    if fps <= 0 or seconds_per_event < 1.0:
        raise XModalError(f"--fps={fps}, --seconds-per-event={seconds_per_event}: expected fps > 0 and >= 1 s per event")
    if image_size % 4:
        raise XModalError(f"--image-size={image_size}: expected a multiple of 4 (YUV 4:2:0 video)")
    workers = min(8, os.cpu_count() or 1) if workers is None else int(workers)
    if workers < 1:
        raise XModalError(f"--workers={workers}: expected >= 1")
    codec = available_video_codec(codec)
    out = Path(out)
    t0 = time.time()
    bar = _progress(n, "synth videos", progress)
    # a story is grouped with probability p so that grouped clips make up the test's share s of the
    # clips: s = g*p / (g*p + 1 - p), i.e. p = s / (g - (g - 1) * s)
    clip_share = n_order / (n_test + n_order)
    grouped_share = clip_share / (group_size - (group_size - 1) * clip_share)

    def items(split: str, count: int, n_caps: int) -> Iterator[Tuple[dict, dict]]:
        made, g = 0, 0
        while made < count:
            rng = _rng(seed, "videos", split, g)
            backdrop, visible, camera = _target_look(rng, events, image_size)
            base = ev.sample_story(rng, n_events=events, colours=visible, backdrop=backdrop)
            grouped = split == "test_order" or (split == "train" and rng.random() < grouped_share)
            for v, (variant, story) in enumerate(ev.variants(base, group_size if grouped else 1, rng)):
                if made == count:
                    break
                item_id = f"{split}-{g:05d}-{v}"
                rel = f"videos/{split}/{item_id}.mp4"
                row = {"id": item_id, "video": rel,
                       "captions": ev.story_captions(story, rng, n_caps, register="target"),
                       "descriptions": ev.story_descriptions(story, seconds_per_event)}
                meta = {"id": item_id, "group": g, "variant": variant, "story": story.to_dict(),
                        "camera": camera.to_dict(), "fps": fps, "seconds_per_event": seconds_per_event}
                made += 1
                yield row, meta, (str(out / rel), story, camera, fps, seconds_per_event, image_size, codec)
            g += 1

    splits, jobs = {}, []
    for split, count, caps in (("test", n_test, captions_test), ("test_order", n_order, captions_test),
                               ("train", n_train, captions_train)):
        if count == 0:
            continue
        rows, meta, clip_jobs = zip(*items(split, count, caps))
        splits[split] = (list(rows), list(meta))
        jobs += clip_jobs
    metas = [m for _, split_meta in splits.values() for m in split_meta]
    for m, n_frames in zip(metas, _film_all(jobs, workers, bar)):
        m["frames"] = n_frames
    bar.close()
    return _finish(out, "videos", splits, t0, command, seed=seed, image_size=image_size, fps=fps,
                   seconds_per_event=seconds_per_event, events=events, group_size=group_size,
                   captions_train=captions_train, captions_test=captions_test, codec=codec)


def _film_clip(job) -> int:
    """Film, encode and write one clip (a worker's unit of work); returns its frame count."""
    path, story, camera, fps, seconds_per_event, image_size, codec = job
    frames = film(ev.render_clip(story, fps, seconds_per_event, image_size), camera)
    atomic_write_bytes(Path(path), mp4_bytes(frames, fps, codec))
    return int(frames.shape[0])


def _film_all(jobs: Sequence[tuple], workers: int, bar) -> List[int]:
    """Every clip's frame count, in order; clips filmed in `workers` processes (this one for few clips)."""
    counts = []
    for n_frames in process_map(_film_clip, jobs, workers if len(jobs) >= 2 * workers else 1, chunksize=8):
        counts.append(n_frames)
        bar.update(1)
    return counts


# ----------------------------------------------------------------- shifted image set
def write_shifted_images(out: str | os.PathLike, n: int = 1200, n_test: int = 200, seed: int = 0,
                         image_size: int = 64, captions_per_image: int = 5, progress: bool = True,
                         command: Optional[str] = None) -> Dict:
    """Image-text retrieval under distribution shift: new backgrounds and new phrasings, k captions each."""
    n_train = _check_sizes(n, n_test, "shifted-images")
    out = Path(out)
    t0 = time.time()
    bar = _progress(n, "synth shifted images", progress)
    kinds = sorted(SHIFTED_BACKGROUNDS)

    def items(split: str, count: int) -> Iterator[Tuple[dict, dict]]:
        for i in range(count):
            rng = _rng(seed, "shifted-images", split, i)
            bg_kind = kinds[int(rng.integers(len(kinds)))]
            background = SHIFTED_BACKGROUNDS[bg_kind](image_size, rng)
            visible = [c for c in COLOURS if contrast_ok(c, background)]
            things = sample_scene(rng, colours=visible)
            jitter = _jitter(rng, len(things))
            image = _render_scene(things, jitter, background)
            item_id = f"{split}-{i:06d}"
            rel = f"images/{split}/{i:06d}.png"
            atomic_write_bytes(out / rel, png_bytes(image))
            bar.update(1)
            yield ({"id": item_id, "image": rel,
                    "captions": phr.shifted_captions(things, bg_kind, rng, captions_per_image)},
                   {"id": item_id, "objects": [t.to_dict() for t in things], "jitter": jitter,
                    "background": bg_kind})

    splits = {}
    for split, count in (("test", n_test), ("train", n_train)):
        rows, meta = zip(*items(split, count))
        splits[split] = (list(rows), list(meta))
    bar.close()
    return _finish(out, "shifted-images", splits, t0, command, seed=seed, image_size=image_size,
                   captions_per_image=captions_per_image)


# ----------------------------------------------------------------------------- common
def _finish(out: Path, kind: str, splits: Dict[str, Tuple[List[dict], List[dict]]], t0: float,
            command: Optional[str], **params) -> Dict:
    for split, (rows, meta) in splits.items():
        write_jsonl(out / "meta" / f"{split}.jsonl", meta)
        write_jsonl(out / f"{split}.jsonl", rows)
    summary = {
        "kind": kind,
        "generator_version": GENERATOR_VERSIONS[kind],
        **params,
        "counts": {split: len(rows) for split, (rows, _) in splits.items()},
        "captions": {split: sum(len(r["captions"]) for r in rows) for split, (rows, _) in splits.items()},
        "seconds": round(time.time() - t0, 2),
    }
    if command:
        summary["command"] = command
    atomic_write_text(out / "synth.json", json.dumps(summary, indent=2) + "\n")
    return summary


WRITERS: Dict[str, Callable[..., Dict]] = {
    "images": write_image_corpus,
    "videos": write_video_set,
    "shifted-images": write_shifted_images,
}


def read_jsonl(path: str | os.PathLike) -> List[dict]:
    """Rows of a plain JSONL annotation file (raises DataError naming the line on bad JSON)."""
    from xmodal.errors import DataError

    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found (expected a JSONL annotation file)")
    rows = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{lineno}: invalid JSON ({exc.msg})") from None
    return rows

"""The generated world: determinism, file format, and that pictures and captions agree."""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import replace
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image

from xmodal.cli import main
from xmodal.errors import XModalError
from xmodal.synth import captions as phr
from xmodal.synth import events as ev
from xmodal.synth import read_jsonl, write_image_corpus, write_shifted_images, write_video_set
from xmodal.synth.camera import Camera, film
from xmodal.synth.scenes import (
    COLOURS, SHAPES, Shape, Thing, cell_centre, dark_background, plain_background, radius_px, render,
)

FPS, SPE = 2.0, 4.0  # small clips for tests: 8 s at 2 fps = 16 frames


@pytest.fixture(scope="module")
def video_set(tmp_path_factory):
    out = tmp_path_factory.mktemp("videos")
    write_video_set(out, n=28, n_test=8, n_order=8, seed=5, fps=FPS, seconds_per_event=SPE, events=2, group_size=4,
                    captions_train=3, captions_test=1, progress=False)
    return out


@pytest.fixture(scope="module")
def image_set(tmp_path_factory):
    out = tmp_path_factory.mktemp("images")
    write_image_corpus(out, n=60, n_test=20, seed=2, progress=False)
    return out


def decode(path: Path) -> np.ndarray:
    with av.open(str(path)) as c:
        return np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])


def colour_mask(frame: np.ndarray, colour: str, tol: float = 55.0) -> np.ndarray:
    rgb = np.asarray(COLOURS[colour], np.float32)
    return np.linalg.norm(frame.astype(np.float32) - rgb, axis=-1) < tol


def centroid(mask: np.ndarray) -> np.ndarray:
    ys, xs = np.nonzero(mask)
    assert len(xs) > 0, "object not found in frame"
    return np.array([xs.mean(), ys.mean()])


# ----------------------------------------------------------------------------- scenes
@pytest.mark.parametrize("shape", SHAPES)
def test_each_shape_is_drawn_where_and_as_big_as_asked(shape):
    bg = plain_background(64, (0, 0, 0))
    areas = {}
    for size in ("small", "large"):
        thing = Thing(shape, "red", size, "solid", (2, 0))  # top right
        img = render([thing.to_shape(64)], bg)
        mask = colour_mask(img, "red", tol=40)
        areas[size] = mask.sum()
        x, y = cell_centre((2, 0), 64)
        c = centroid(mask)
        assert abs(c[0] - x) < 2.0 and abs(c[1] - y) < 3.0  # triangles/stars sit slightly off their centre
        assert mask[:, :32].sum() == 0 and mask[43:, :].sum() == 0  # nothing outside its cell
    assert areas["large"] > 2.0 * areas["small"] > 0


def test_shapes_and_textures_are_distinguishable():
    bg = plain_background(64, (0, 0, 0))
    masks = [render([Shape(s, "white", "solid", 32, 32, radius_px("large", 64))], bg)[..., 0] > 128 for s in SHAPES]
    for i in range(len(SHAPES)):
        for j in range(i + 1, len(SHAPES)):
            assert (masks[i] != masks[j]).sum() >= 20, (SHAPES[i], SHAPES[j])
    solid, striped, dotted = (render([Shape("square", "green", t, 32, 32, 11)], bg) for t in ("solid", "striped", "dotted"))
    covered = solid.sum(-1) > 0
    for tex in (striped, dotted):
        assert (tex.sum(-1) > 0).sum() == covered.sum()  # same silhouette...
        assert (np.abs(tex.astype(int) - solid).sum(-1) > 60).sum() > 10  # ...different inside


# ------------------------------------------------------------------------ determinism
def _all_bytes(folder: Path) -> dict:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != "synth.json"}


def test_images_same_seed_identical_different_seed_different(tmp_path):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    for out, seed in ((a, 7), (b, 7), (c, 8)):
        write_image_corpus(out, n=10, n_test=3, seed=seed, progress=False)
    assert _all_bytes(a) == _all_bytes(b)
    assert (a / "train.jsonl").read_text() != (c / "train.jsonl").read_text()
    px_a = np.asarray(Image.open(a / "images/train/000000.png"))
    px_c = np.asarray(Image.open(c / "images/train/000000.png"))
    assert not np.array_equal(px_a, px_c)


def test_videos_same_seed_identical_pixels(tmp_path):
    kw = dict(n=4, n_test=2, fps=FPS, seconds_per_event=SPE, progress=False)
    write_video_set(tmp_path / "a", seed=1, **kw)
    write_video_set(tmp_path / "b", seed=1, **kw)
    write_video_set(tmp_path / "c", seed=2, **kw)
    rows = read_jsonl(tmp_path / "a/train.jsonl")
    assert rows == read_jsonl(tmp_path / "b/train.jsonl") != read_jsonl(tmp_path / "c/train.jsonl")
    for row in rows:
        fa, fb = decode(tmp_path / "a" / row["video"]), decode(tmp_path / "b" / row["video"])
        assert np.array_equal(fa, fb)
    assert not np.array_equal(decode(tmp_path / "a" / rows[0]["video"]), decode(tmp_path / "c" / rows[0]["video"]))


@pytest.mark.parametrize("codec", ["libx264", "mpeg4"])
def test_encoded_clip_matches_the_rendered_frames(tmp_path, codec):
    write_video_set(tmp_path, n=2, n_test=1, seed=0, fps=FPS, seconds_per_event=SPE, codec=codec, progress=False)
    row, meta = read_jsonl(tmp_path / "test.jsonl")[0], read_jsonl(tmp_path / "meta/test.jsonl")[0]
    rendered = film(ev.render_clip(ev.Story.from_dict(meta["story"]), FPS, SPE, 64), Camera.from_dict(meta["camera"]))
    decoded = decode(tmp_path / row["video"])
    assert decoded.shape == rendered.shape
    assert np.abs(decoded.astype(int) - rendered).mean() < 5.0
    assert json.loads((tmp_path / "synth.json").read_text())["codec"] == codec
    with pytest.raises(XModalError, match="codec"):
        write_video_set(tmp_path / "x", n=2, n_test=1, codec="no-such-codec", progress=False)


# ----------------------------------------------------------------------------- format
@pytest.mark.parametrize("which", ["image_set", "video_set"])
def test_jsonl_format(which, request):
    folder = request.getfixturevalue(which)
    info = json.loads((folder / "synth.json").read_text())
    key = "image" if which == "image_set" else "video"
    seen = set()
    for split in ("train", "test") + (("test_order",) if key == "video" else ()):
        rows = read_jsonl(folder / f"{split}.jsonl")
        assert len(rows) == info["counts"][split]
        for row in rows:
            assert set(row) <= {"id", key, "captions", "descriptions"}
            assert row["id"] not in seen
            seen.add(row["id"])
            assert not Path(row[key]).is_absolute() and (folder / row[key]).is_file()
            assert row["captions"] and all(isinstance(c, str) and c for c in row["captions"])
            if key == "video":  # spatial: start and end scene; temporal: the two events in order
                assert [len(row["descriptions"][k]) for k in ("spatial", "temporal")] == [2, 2]
                frames = decode(folder / row[key])
                assert frames.shape == (int(2 * SPE * FPS), 64, 64, 3)
            else:
                assert Image.open(folder / row[key]).size == (64, 64)
    assert info["counts"] == ({"train": 12, "test": 8, "test_order": 8} if key == "video" else {"train": 40, "test": 20})


def test_video_captions_per_split(video_set):
    assert all(len(r["captions"]) == 1 for split in ("test", "test_order")
               for r in read_jsonl(video_set / f"{split}.jsonl"))
    assert all(len(r["captions"]) == 3 and len(set(r["captions"])) == 3 for r in read_jsonl(video_set / "train.jsonl"))


def test_held_out_scenes_never_in_training(image_set):
    def keys(split):
        return [tuple(sorted(json.dumps(o, sort_keys=True) for o in m["objects"]))
                for m in read_jsonl(image_set / "meta" / f"{split}.jsonl")]

    test_keys = keys("test")
    assert len(set(test_keys)) == len(test_keys)
    assert not set(test_keys) & set(keys("train"))


def test_image_captions_name_every_object(image_set):
    rows = read_jsonl(image_set / "train.jsonl")
    metas = read_jsonl(image_set / "meta" / "train.jsonl")
    for row, meta in zip(rows, metas):
        img = np.asarray(Image.open(image_set / row["image"]))
        for cap in row["captions"]:
            for o in meta["objects"]:
                assert re.search(rf"\b{o['size']} {o['colour']}\b", cap) and o["shape"] in cap
        for o in meta["objects"]:  # and the picture shows each object in its cell
            c = np.array(cell_centre(tuple(o["cell"]), 64))
            assert colour_mask(img[int(c[1]) - 3:int(c[1]) + 4, int(c[0]) - 3:int(c[0]) + 4], o["colour"]).any()


# -------------------------------------------------------------- events vs pixels/text
def _event_frames(k: int) -> tuple:
    """Frame indices just before and well after event k's window."""
    return int(k * SPE * FPS), int((k * SPE + 0.8 * SPE) * FPS)


def test_video_frames_show_the_described_events(video_set):
    """Each clip file is its story filmed; the story, drawn on black without the camera, shows its events."""
    checked = {kind: 0 for kind in ev.EVENT_KINDS}
    for split in ("train", "test"):
        for row, meta in zip(read_jsonl(video_set / f"{split}.jsonl"), read_jsonl(video_set / "meta" / f"{split}.jsonl")):
            story = ev.Story.from_dict(meta["story"])
            filmed = film(ev.render_clip(story, FPS, SPE, 64), Camera.from_dict(meta["camera"]))
            assert np.abs(decode(video_set / row["video"]).astype(int) - filmed).mean() < 5.0
            black = replace(story, background={"kind": "light", "rgb": [0, 0, 0]})
            frames = ev.render_clip(black, FPS, SPE, 64)
            for k, e in enumerate(story.events):
                a = story.actors[e.actor]
                i0, i1 = _event_frames(k)
                before, after = frames[i0], frames[i1]
                if e.kind == "move":
                    shift = centroid(colour_mask(after, a.colour)) - centroid(colour_mask(before, a.colour))
                    dx, dy = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}[e.direction]
                    along = shift[0] * dx + shift[1] * dy
                    across = abs(shift[0] * dy) + abs(shift[1] * dx)
                    assert along > 15 and across < 4, (row["id"], e, shift)
                elif e.kind in ("appear", "disappear"):
                    n0, n1 = colour_mask(before, a.colour).sum(), colour_mask(after, a.colour).sum()
                    absent, present = (n0, n1) if e.kind == "appear" else (n1, n0)
                    assert absent == 0 and present > 15, (row["id"], e, n0, n1)
                    if e.kind == "appear" and k == len(story.events) - 1:
                        assert colour_mask(frames[0], a.colour).sum() == 0 and colour_mask(frames[-1], a.colour).sum() > 15
                elif e.kind == "recolour":
                    assert colour_mask(before, a.colour).sum() > 15 and colour_mask(before, e.colour).sum() == 0
                    assert colour_mask(after, e.colour).sum() > 15 and colour_mask(after, a.colour).sum() == 0
                else:
                    n0, n1 = colour_mask(before, a.colour).sum(), colour_mask(after, a.colour).sum()
                    assert (n1 > 1.8 * n0) if e.kind == "grow" else (n0 > 1.8 * n1), (row["id"], e, n0, n1)
                checked[e.kind] += 1
    assert sum(checked.values()) == 2 * 20 and sum(v > 0 for v in checked.values()) >= 4


_WORDS = {"colour": {**{c: c for c in COLOURS}, **{w: c for c, ws in phr._COLOUR_SYNONYMS.items() for w in ws}},
          "shape": {**{s: s for s in SHAPES}, **{w: s for s, ws in phr._SHAPE_SYNONYMS.items() for w in ws}}}


def _alternatives(words) -> str:
    return "|".join(re.escape(w) for w in sorted(words, key=len, reverse=True))


_VERBS = {
    "move": r"(moves|slides|goes)( to the)? (?P<dir>left|right|up|down)",
    "appear": r"(appears|shows up|pops up)",
    "disappear": r"(disappears|vanishes|goes away)",
    "recolour": r"(turns|changes colour to|becomes) (?P<col>\w+)",
    "grow": r"(grows|gets bigger)",
    "shrink": r"(shrinks|gets smaller)",
}


def parse_caption(caption: str) -> list:
    """Events (kind, colour, shape, detail) of a caption, in the temporal order the text states."""
    colours, shapes = _alternatives(_WORDS["colour"]), _alternatives(_WORDS["shape"])
    clause = re.compile(rf"(?:the|a|an) (?:\w+ )?(?P<colour>{colours}) (?P<shape>{shapes}) (?P<rest>.*?)"
                        rf"(?=, then|, and after that| before |, and finally|; next|; last|\. then|, |$| after )")
    found = []
    for m in clause.finditer(caption):
        for kind, pattern in _VERBS.items():
            v = re.match(pattern, m.group("rest"))
            if v:
                detail = v.groupdict().get("dir") or _WORDS["colour"].get(v.groupdict().get("col"))
                found.append((m.start(), (kind, _WORDS["colour"][m.group("colour")], _WORDS["shape"][m.group("shape")],
                                          detail)))
                break
    found.sort()
    events = [f for _, f in found]
    # "Y after X" states the later event first; "after X, Y" and every other frame are in order
    if re.search(r"\w after (the|a|an) ", caption) and not caption.startswith("after "):
        events.reverse()
    return events


def test_captions_state_the_events_in_order(video_set):
    n = 0
    for split in ("train", "test", "test_order"):
        for row, meta in zip(read_jsonl(video_set / f"{split}.jsonl"), read_jsonl(video_set / "meta" / f"{split}.jsonl")):
            story = ev.Story.from_dict(meta["story"])
            expected = []
            for e in story.events:
                a = story.actors[e.actor]
                detail = e.direction if e.kind == "move" else e.colour
                expected.append((e.kind, a.colour, a.shape, detail))
            for caption in row["captions"]:
                assert parse_caption(caption) == expected, caption
                n += 1
    assert n == 12 * 3 + 8 + 8


def test_parser_reads_order_from_connectives():
    assert [e[0] for e in parse_caption("a blue square appears after the red circle moves left")] == ["move", "appear"]
    assert [e[0] for e in parse_caption("after the red circle moves left, a blue square appears")] == ["move", "appear"]
    assert [e[0] for e in parse_caption("the red circle moves left before a blue square appears")] == ["move", "appear"]
    assert parse_caption("the violet round disk turns turquoise, then a big block pops up in the upper left")[:1] == \
        [("recolour", "purple", "circle", "cyan")]


# ---------------------------------------------------------------------- hard negatives
def _groups(video_set, split):
    groups = {}
    for m in read_jsonl(video_set / "meta" / f"{split}.jsonl"):
        groups.setdefault(m["group"], []).append(m)
    return groups


def test_main_test_set_has_distinct_stories_and_the_order_subset_holds_the_hard_negatives(video_set):
    assert [len(g) for g in _groups(video_set, "test").values()] == [1] * 8
    assert [len(g) for g in _groups(video_set, "test_order").values()] == [4, 4]
    sizes = [len(g) for g in _groups(video_set, "train").values()]
    assert set(sizes[:-1]) <= {1, 4} and {1, 4} <= set(sizes) and sum(sizes) == 12  # training mixes both kinds


def test_hard_negative_groups_differ_only_in_time(video_set):
    groups = _groups(video_set, "test_order")
    assert [len(g) for g in groups.values()] == [4, 4]
    for members in groups.values():
        stories = {m["variant"]: ev.Story.from_dict(m["story"]) for m in members}
        base = stories["base"]
        assert stories["swapped"].events == tuple(reversed(base.events))
        assert all(m["camera"] == members[0]["camera"] for m in members)
        for s in stories.values():
            assert [(a.shape, a.texture) for a in s.actors] == [(a.shape, a.texture) for a in base.actors]
            assert s.background == base.background and s.jitter == base.jitter
        rev = stories["reversed"]
        changed = [k for k in range(2) if rev.events[k] != base.events[k]]
        assert len(changed) == 1
        k = changed[0]
        assert rev.events[k].kind == {"appear": "disappear", "disappear": "appear", "grow": "shrink",
                                      "shrink": "grow"}.get(base.events[k].kind, base.events[k].kind)


@pytest.mark.parametrize("kind", ev.EVENT_KINDS)
def test_time_reversed_event_is_the_same_clip_played_backwards(kind):
    rng = np.random.default_rng(0)
    story = next(s for s in (ev.sample_story(rng, n_events=1) for _ in range(500)) if s.events[0].kind == kind)
    rev = ev.time_reversed(story, 0)
    for t in (0.0, 0.3 * SPE, 0.45 * SPE, 0.6 * SPE, 0.8 * SPE, SPE):
        fwd = ev.actor_states(story, t, SPE, 64)
        back = ev.actor_states(rev, SPE - t, SPE, 64)
        for f, b in zip(fwd, back):
            assert (f is None) == (b is None)
            if f is not None:
                assert f.colour == b.colour and f.shape == b.shape
                assert np.allclose([f.x, f.y, f.radius], [b.x, b.y, b.radius], atol=1e-6)


# --------------------------------------------------------------------------- shifted
def test_shifted_set_has_new_backgrounds_and_several_phrasings(tmp_path):
    write_shifted_images(tmp_path, n=30, n_test=10, seed=0, captions_per_image=5, progress=False)
    rows = read_jsonl(tmp_path / "test.jsonl")
    assert all(len(set(r["captions"])) == 5 for r in rows)
    pretrain_bg = dark_background(64, np.random.default_rng(0)).mean()
    brighter = [np.asarray(Image.open(tmp_path / r["image"])).astype(float).mean() > pretrain_bg + 20 for r in rows]
    assert np.mean(brighter) > 0.8
    words = " ".join(c for r in rows for c in r["captions"])
    assert re.search(r"\b(disc|box|block|rhombus|plus sign|plus shape|star shape|five-pointed star|three-sided)\b", words)


def test_video_world_is_shifted_from_pretraining_in_look_and_words(video_set, image_set):
    """Brighter, textured backdrops through a camera (colour cast, noise) and words pretraining never used."""
    pretrain_words = {w for r in read_jsonl(image_set / "train.jsonl") for c in r["captions"] for w in c.split()}
    rows = [r for split in ("train", "test") for r in read_jsonl(video_set / f"{split}.jsonl")]
    words = {w for r in rows for c in r["captions"] for w in re.findall(r"[\w-]+", c)}
    synonyms = {w for ws in (*phr._SHAPE_SYNONYMS.values(), *phr._COLOUR_SYNONYMS.values()) for x in ws
                for w in x.split()}
    assert len((words & synonyms) - pretrain_words) >= 4
    pretrain_mean = np.mean([np.asarray(Image.open(image_set / r["image"])).mean()
                             for r in read_jsonl(image_set / "train.jsonl")])
    first_frames = [decode(video_set / r["video"])[0] for r in rows]
    assert np.mean([f.mean() > pretrain_mean + 30 for f in first_frames]) > 0.8
    metas = [m for split in ("train", "test") for m in read_jsonl(video_set / "meta" / f"{split}.jsonl")]
    assert all(m["camera"]["noise"] > 0 and m["camera"]["gain"] != [1.0, 1.0, 1.0] for m in metas)
    assert {m["story"]["background"]["kind"] for m in metas} <= {"gradient", "noise", "light"}


def test_pretraining_corpus_is_unchanged(tmp_path):
    """`xmodal synth images` feeds the committed xmodal-tiny weights: its files must not change."""
    write_image_corpus(tmp_path, n=30, n_test=10, seed=0, progress=False)
    h = hashlib.sha256()
    for f in sorted(p for p in tmp_path.rglob("*") if p.is_file() and p.name != "synth.json"):
        h.update(str(f.relative_to(tmp_path)).encode())
        h.update(f.read_bytes())
    assert h.hexdigest() == "9ae159f36d15c2e0593d8af83615bcc358db3429a7b398082e7be4681f6d3b0c"
    assert json.loads((tmp_path / "synth.json").read_text())["generator_version"] == 1


# ---------------------------------------------------------------------------------- CLI
def test_cli_synth_and_errors(tmp_path, capsys):
    assert main(["synth", "images", "--out", str(tmp_path / "i"), "--n", "5", "--split-test", "2",
                 "--seed", "3", "--no-progress"]) == 0
    info = json.loads((tmp_path / "i/synth.json").read_text())
    assert info["counts"] == {"test": 2, "train": 3} and info["seed"] == 3
    assert info["command"].startswith("xmodal synth images --out")
    assert main(["synth", "videos", "--out", str(tmp_path / "v"), "--n", "4", "--split-test", "4",
                 "--no-progress"]) == 2
    assert "--split-test=4" in capsys.readouterr().err
    assert main(["synth", "videos", "--out", str(tmp_path / "v"), "--n", "8", "--split-test", "4",
                 "--split-order", "4", "--no-progress"]) == 2
    assert "--split-order=4" in capsys.readouterr().err and not (tmp_path / "v").exists()
    with pytest.raises(XModalError, match="events"):
        write_video_set(tmp_path / "w", n=4, n_test=1, events=5, progress=False)


def test_training_split_has_the_test_share_of_order_groups(tmp_path):
    """Grouped (order-variant) clips make up the same share of the training clips as of the test clips.

    Generator version 2 drew each training *story* as grouped with that share, so with groups of four
    most training clips were order variants of each other (here 0.8 instead of 0.5).
    """
    write_video_set(tmp_path, n=150, n_test=20, n_order=20, seed=1, image_size=32, fps=1.0, seconds_per_event=1.0,
                    events=2, group_size=4, captions_train=1, progress=False, workers=1)
    sizes = [len(g) for g in _groups(tmp_path, "train").values()]
    share = sum(s for s in sizes if s > 1) / sum(sizes)
    assert 0.3 <= share <= 0.68, share

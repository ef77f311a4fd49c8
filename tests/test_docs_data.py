"""docs/DATA.md cannot rot: its runnable command blocks run as written and print what they claim.

A fenced block tagged ```` ```bash runnable ```` is a list of commands run in a scratch folder
laid out as the guide describes; a `# -> TEXT` line after a command says what its stdout must
contain. A block tagged ```` ```jsonl file=PATH ```` (or any language with `file=PATH`) is
written to PATH first, and the media its lines name are generated (videos with PyAV, images
with PIL), so the own-data example is the guide's own text, byte for byte.

Benchmark blocks run against the real annotation files (`../shared/data` or
XMODAL_TEST_DATA), linked into `data/<benchmark>/annotations/` of the scratch folder the way
the guide says to lay them out (never copied into the repository); they skip without them.
"""

from __future__ import annotations

import json
import os
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import pytest

from conftest import SHARED
from xmodal.cli import main

ROOT = Path(__file__).resolve().parents[1]
DATA_MD = ROOT / "docs" / "DATA.md"
FENCE = re.compile(r"^```(\S*)([^\n]*)\n(.*?)^```\s*$", re.M | re.S)


@dataclass
class Block:
    """One fenced block of a Markdown file: language, tags, text, and the section it is in."""

    lang: str
    tags: List[str]
    text: str
    section: str
    line: int

    @property
    def runnable(self) -> bool:
        return self.lang == "bash" and "runnable" in self.tags

    @property
    def file(self) -> Optional[str]:
        return next((t[len("file="):] for t in self.tags if t.startswith("file=")), None)


@dataclass
class Command:
    """One command of a runnable block and the texts its stdout must contain."""

    argv: List[str]
    expect: List[str] = field(default_factory=list)
    line: int = 0

    def __str__(self) -> str:
        return shlex.join(self.argv)


def blocks(path: Path) -> List[Block]:
    text = path.read_text(encoding="utf-8")
    out = []
    for m in FENCE.finditer(text):
        before = text[:m.start()]
        headings = re.findall(r"^##+ (.+)$", before, re.M)
        out.append(Block(m.group(1), m.group(2).split(), m.group(3), headings[-1] if headings else "",
                         before.count("\n") + 1))
    return out


def commands(block: Block) -> List[Command]:
    """Commands of a block (a trailing backslash continues a line); `# -> TEXT` lines attach to the previous one."""
    out: List[Command] = []
    pending = ""
    for n, raw in enumerate(block.text.splitlines(), block.line + 1):
        line = raw.strip()
        if line.startswith("# ->"):
            assert out, f"line {n}: '# ->' before any command"
            out[-1].expect.append(line[len("# ->"):].strip())
            continue
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        out.append(Command(shlex.split(pending + line, comments=True), line=n))
        pending = ""
    return out


def run_xmodal(command: Command, cwd: Path, capsys) -> str:
    """Run an `xmodal ...` command in-process in `cwd`; assert exit 0 and the expected output."""
    assert command.argv[0] == "xmodal", f"not an xmodal command: {command}"
    capsys.readouterr()
    old = os.getcwd()
    os.chdir(cwd)
    try:
        code = main(command.argv[1:])
    finally:
        os.chdir(old)
    out, err = capsys.readouterr()
    assert code == 0, f"`{command}` exited {code}:\n{err[-2000:]}"
    for text in command.expect:
        assert text in out, f"`{command}` should print {text!r}; printed:\n{out[-2000:]}"
    return out


# ------------------------------------------------------------------ generated media
def write_media_of_jsonl(jsonl: Path) -> List[Path]:
    """Generate every video/image a JSONL file names (long enough for its segments) -> the paths."""
    from PIL import Image

    from videos import write_video

    longest: Dict[Path, float] = {}
    images = set()
    for line in jsonl.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        rec = json.loads(line)
        if "image" in rec:
            images.add(jsonl.parent / rec["image"])
        else:
            path = jsonl.parent / rec["video"]
            longest[path] = max(longest.get(path, 0.0), float(rec.get("end") or 0.0))
    for k, path in enumerate(sorted(images)):
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (48, 40), (40 + 60 * k, 200 - 50 * k, 90)).save(path)
    for k, (path, end) in enumerate(sorted(longest.items())):
        path.parent.mkdir(parents=True, exist_ok=True)
        seconds = max(int(end) + 2, 6)
        write_video(path, num_frames=2 * seconds, fps=2, color_of=lambda i, k=k: 7 * k + i // 2)
    return sorted(images) + sorted(longest)


def write_file_blocks(doc: List[Block], cwd: Path) -> List[Path]:
    written = []
    for block in doc:
        if block.file:
            path = cwd / block.file
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(block.text, encoding="utf-8")
            written.append(path)
    return written


# ------------------------------------------------------------------ real annotation files
#: benchmark -> (shared annotation folder, media links: (shared folder, folder under data/<benchmark>/))
BENCHMARKS: Dict[str, Tuple[str, Tuple[str, str]]] = {
    "msrvtt": ("annotations/msrvtt", ("video/msrvtt_1kA", "videos")),
    "msvd": ("annotations/msvd", ("", "")),
    "didemo": ("annotations/didemo", ("", "")),
    "activitynet": ("annotations/activitynet", ("", "")),
    "coco": ("annotations/coco", ("image/coco_karpathy_test", "images/val2014")),
    "flickr30k": ("annotations/flickr30k", ("", "")),
}
SECTION_OF = {"msrvtt": "MSR-VTT", "msvd": "MSVD", "didemo": "DiDeMo", "activitynet": "ActivityNet Captions",
              "coco": "COCO", "flickr30k": "Flickr30K", "lsmdc": "LSMDC"}


def link_benchmark(name: str, shared: Path, cwd: Path) -> Path:
    """data/<name>/annotations/* (and the few real media) as symlinks to the shared files."""
    annotations, (media_src, media_dst) = BENCHMARKS[name]
    root = cwd / "data" / name
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    for f in (shared / annotations).iterdir():
        (root / "annotations" / f.name).symlink_to(f)
    if media_src:
        (root / media_dst).mkdir(parents=True, exist_ok=True)
        for f in (shared / media_src).iterdir():
            if f.suffix in (".mp4", ".jpg"):
                (root / media_dst / f.name).symlink_to(f)
    return root


# ------------------------------------------------------------------ tests
DOC = blocks(DATA_MD)


def _runnable(section: str) -> List[Block]:
    return [b for b in DOC if b.runnable and b.section.startswith(section)]


def test_guide_has_a_checked_command_per_benchmark_and_for_own_data():
    for name, section in SECTION_OF.items():
        titles = [b.section for b in DOC if b.section.startswith(section)]
        assert titles, f"docs/DATA.md has no section {section!r}"
        if name == "lsmdc":  # registration-only files: shown, not run
            assert any("data inspect lsmdc" in b.text for b in DOC if b.section.startswith(section))
            continue
        runs = [c for b in _runnable(section) for c in commands(b)]
        assert any(c.argv[:3] == ["xmodal", "data", "inspect"] and c.argv[3] == name and c.expect for c in runs), \
            f"{section}: no runnable `xmodal data inspect {name}` with an expected count"
    own = [c for b in _runnable("Your own data") for c in commands(b)]
    assert [c.argv[1] for c in own] == ["data", "eval"]


def test_own_data_example_has_every_documented_field():
    """The example shows segments, both description forms, an image and multi-caption lines."""
    (example,) = [b for b in DOC if b.file == "mydata/test.jsonl"]
    records = [json.loads(line) for line in example.text.splitlines() if line.strip()]
    assert any("start" in r and "end" in r for r in records)
    assert any(isinstance(r.get("descriptions"), list) for r in records)
    assert any(isinstance(r.get("descriptions"), dict) and {"spatial", "temporal"} <= set(r["descriptions"])
               for r in records)
    assert any("image" in r for r in records) and any(len(r["captions"]) > 1 for r in records)


@pytest.fixture(scope="module")
def own_data_dir(tmp_path_factory) -> Path:
    cwd = tmp_path_factory.mktemp("guide")
    files = write_file_blocks(DOC, cwd)
    assert cwd / "mydata" / "test.jsonl" in files
    assert len(write_media_of_jsonl(cwd / "mydata" / "test.jsonl")) == 3  # kitchen.mp4, park.mp4, car.jpg
    return cwd


def test_own_data_from_inspect_to_eval_as_written(own_data_dir, capsys):
    """A newcomer's path: the guide's JSONL, its inspect and eval commands, verbatim."""
    for block in _runnable("Your own data"):
        for command in commands(block):
            run_xmodal(command, own_data_dir, capsys)
    metrics = json.loads((own_data_dir / "eval/mydata/metrics.json").read_text())
    run = metrics["run"]
    assert run["dataset"] == "jsonl" and run["num_gallery"] == 4 and run["num_queries"] == {"t2v": 6, "v2t": 4}
    assert run["pretrained"] == "xmodal" and not run["partial"]
    assert 0 <= metrics["t2v/R@1"] <= 100


def test_frame_cache_block_is_lossless_as_claimed(own_data_dir, capsys):
    """The cache block runs as written and, as the guide says, gives the numbers decoding gives."""
    if not (own_data_dir / "eval/mydata/metrics.json").is_file():
        test_own_data_from_inspect_to_eval_as_written(own_data_dir, capsys)
    for block in _runnable("Frame cache"):
        for command in commands(block):
            run_xmodal(command, own_data_dir, capsys)
    assert (own_data_dir / "cache/mydata/index.json").is_file()
    decoded = json.loads((own_data_dir / "eval/mydata/metrics.json").read_text())
    cached = json.loads((own_data_dir / "eval/mydata_cached/metrics.json").read_text())
    keys = [k for k in decoded if k.startswith(("t2v/", "v2t/"))]
    assert keys and {k: cached[k] for k in keys} == {k: decoded[k] for k in keys}
    assert cached["run"]["frame_cache"] and not decoded["run"]["frame_cache"]


@pytest.mark.parametrize("name", sorted(BENCHMARKS))
def test_benchmark_layout_and_counts_on_real_files(name, tmp_path, capsys):
    if not SHARED.is_dir():
        pytest.skip(f"real annotation files not found at {SHARED} (set XMODAL_TEST_DATA=DIR)")
    root = link_benchmark(name, SHARED, tmp_path)
    ran = 0
    for block in _runnable(SECTION_OF[name]):
        for command in commands(block):
            run_xmodal(command, tmp_path, capsys)
            ran += 1
    assert ran
    linked = [p for p in root.rglob("*") if p.suffix in (".mp4", ".jpg")]
    if linked:  # the few real media, placed where the guide says, are found
        info = json.loads(run_xmodal(Command(["xmodal", "data", "inspect", name, "--root", f"data/{name}", "--json"]),
                                     tmp_path, capsys))
        assert info["missing_media"] == info["items"] - len(linked) and len(linked) >= 13

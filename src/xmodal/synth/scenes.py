"""Vectorised numpy rendering of the generated world: shapes, textures, backgrounds.

Everything is drawn with numpy on coordinate grids (no per-pixel Python loops, no fonts):
a 64x64 scene of three objects takes well under a millisecond, so tens of thousands of
images are generated in about a minute on one core. Shape edges are anti-aliased by
supersampling the coverage mask, so a small object still reads as its shape.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import lru_cache
from typing import Dict, Iterable, Sequence, Tuple

import numpy as np

# Saturated colours that stay far apart after H.264's 4:2:0 chroma subsampling.
COLOURS: Dict[str, Tuple[int, int, int]] = {
    "red": (225, 35, 35),
    "green": (40, 185, 60),
    "blue": (45, 85, 235),
    "yellow": (240, 220, 35),
    "orange": (250, 135, 20),
    "purple": (150, 55, 205),
    "cyan": (35, 215, 225),
    "pink": (250, 120, 195),
    "white": (240, 240, 240),
}
SHAPES: Tuple[str, ...] = ("circle", "square", "triangle", "diamond", "cross", "star")
#: object radius as a fraction of the image side
SIZES: Dict[str, float] = {"small": 0.10, "large": 0.165}
TEXTURES: Tuple[str, ...] = ("solid", "striped", "dotted")

#: a 3x3 grid of named cells (column, row); names are what captions say
CELL_NAMES: Dict[Tuple[int, int], str] = {
    (0, 0): "top left", (1, 0): "top", (2, 0): "top right",
    (0, 1): "left", (1, 1): "center", (2, 1): "right",
    (0, 2): "bottom left", (1, 2): "bottom", (2, 2): "bottom right",
}
CELLS: Tuple[Tuple[int, int], ...] = tuple(CELL_NAMES)
DIRECTIONS: Dict[str, Tuple[int, int]] = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}

_SUPERSAMPLE = 3


@dataclass(frozen=True)
class Shape:
    """One object as drawn: what it is and where (centre and radius in pixels)."""

    shape: str
    colour: str
    texture: str
    x: float
    y: float
    radius: float
    rgb: Tuple[float, float, float] | None = None  # overrides COLOURS[colour] (mid-recolour frames)

    def moved(self, **changes) -> "Shape":
        return replace(self, **changes)


@dataclass(frozen=True)
class Thing:
    """An object as captions see it: named attributes and a grid cell."""

    shape: str
    colour: str
    size: str
    texture: str
    cell: Tuple[int, int]

    def to_shape(self, image_size: int, jitter: Tuple[float, float] = (0.0, 0.0)) -> Shape:
        x, y = cell_centre(self.cell, image_size)
        return Shape(self.shape, self.colour, self.texture, x + jitter[0], y + jitter[1], radius_px(self.size, image_size))

    def to_dict(self) -> dict:
        return {"shape": self.shape, "colour": self.colour, "size": self.size, "texture": self.texture,
                "cell": list(self.cell)}

    @classmethod
    def from_dict(cls, d: dict) -> "Thing":
        return cls(d["shape"], d["colour"], d["size"], d["texture"], tuple(d["cell"]))


def cell_centre(cell: Tuple[int, int], size: int) -> Tuple[float, float]:
    """Pixel centre of a grid cell (the image is cut in three equal columns and rows)."""
    col, row = cell
    step = size / 3.0
    return (col + 0.5) * step, (row + 0.5) * step


def radius_px(size_name: str, size: int) -> float:
    return SIZES[size_name] * size


# ------------------------------------------------------------------------ masks
def _inside(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Boolean inside-test in unit coordinates (u right, v down, object radius 1)."""
    au, av = np.abs(u), np.abs(v)
    if shape == "circle":
        return u * u + v * v <= 1.0
    if shape == "square":
        return np.maximum(au, av) <= 0.82
    if shape == "diamond":
        return au + av <= 1.05
    if shape == "triangle":  # pointing up, base at the bottom
        return (v <= 0.72) & (v >= -0.98 + 1.8 * au)
    if shape == "cross":  # a plus sign
        return ((au <= 0.32) & (av <= 0.98)) | ((av <= 0.32) & (au <= 0.98))
    if shape == "star":  # five points, one pointing up
        rho = np.sqrt(u * u + v * v)
        theta = np.arctan2(v, u) + np.pi / 2
        lobe = 0.5 + 0.5 * np.cos(5 * theta)
        return rho <= 0.42 + 0.62 * lobe**2
    raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


@lru_cache(maxsize=64)
def _subpixel_offsets(ss: int) -> np.ndarray:
    return (np.arange(ss, dtype=np.float32) + 0.5) / ss


def coverage(shape: str, x: float, y: float, radius: float, size: int) -> Tuple[np.ndarray, slice, slice]:
    """Anti-aliased coverage in [0, 1] of a shape over its bounding box.

    Returns (alpha (h, w) float32, row slice, column slice) so callers blend only the box.
    """
    r = max(float(radius), 0.5)
    x0, x1 = max(int(np.floor(x - r - 1)), 0), min(int(np.ceil(x + r + 1)), size)
    y0, y1 = max(int(np.floor(y - r - 1)), 0), min(int(np.ceil(y + r + 1)), size)
    if x1 <= x0 or y1 <= y0:
        return np.zeros((0, 0), np.float32), slice(0, 0), slice(0, 0)
    off = _subpixel_offsets(_SUPERSAMPLE)
    xs = (np.arange(x0, x1, dtype=np.float32)[:, None] + off[None, :]).reshape(-1)
    ys = (np.arange(y0, y1, dtype=np.float32)[:, None] + off[None, :]).reshape(-1)
    u = (xs[None, :] - x) / r
    v = (ys[:, None] - y) / r
    inside = _inside(shape, u, v).astype(np.float32)
    h, w = y1 - y0, x1 - x0
    alpha = inside.reshape(h, _SUPERSAMPLE, w, _SUPERSAMPLE).mean(axis=(1, 3))
    return alpha, slice(y0, y1), slice(x0, x1)


def texture_shade(texture: str, x: float, y: float, rows: slice, cols: slice) -> np.ndarray:
    """Per-pixel brightness factor of a texture, anchored to the object's centre so it moves with it."""
    h, w = rows.stop - rows.start, cols.stop - cols.start
    if texture == "solid":
        return np.ones((h, w), np.float32)
    py = np.arange(rows.start, rows.stop, dtype=np.float32)[:, None] + 0.5 - y
    px = np.arange(cols.start, cols.stop, dtype=np.float32)[None, :] + 0.5 - x
    if texture == "striped":  # diagonal stripes, period 4 px
        band = np.floor((px + py) / 2.0).astype(np.int64) % 2
        return np.where(band == 0, 1.0, 0.4).astype(np.float32)
    if texture == "dotted":  # dark dots on a 4 px lattice
        dx = (px % 4.0) - 2.0
        dy = (py % 4.0) - 2.0
        return np.where(dx * dx + dy * dy <= 1.3, 0.35, 1.0).astype(np.float32)
    raise ValueError(f"unknown texture {texture!r}; expected one of {TEXTURES}")


def draw(canvas: np.ndarray, obj: Shape) -> None:
    """Alpha-blend one object onto a float32 (H, W, 3) canvas in place."""
    size = canvas.shape[0]
    alpha, rows, cols = coverage(obj.shape, obj.x, obj.y, obj.radius, size)
    if alpha.size == 0:
        return
    rgb = np.asarray(obj.rgb if obj.rgb is not None else COLOURS[obj.colour], np.float32)
    paint = texture_shade(obj.texture, obj.x, obj.y, rows, cols)[..., None] * rgb
    region = canvas[rows, cols]
    a = alpha[..., None]
    canvas[rows, cols] = region * (1.0 - a) + paint * a


def render(objects: Iterable[Shape], background: np.ndarray) -> np.ndarray:
    """Draw objects in order over a background (H, W, 3); returns uint8 (H, W, 3)."""
    canvas = np.array(background, dtype=np.float32, copy=True)
    for obj in objects:
        draw(canvas, obj)
    return np.clip(np.rint(canvas), 0, 255).astype(np.uint8)


# ------------------------------------------------------------------ backgrounds
def plain_background(size: int, rgb: Sequence[float]) -> np.ndarray:
    return np.broadcast_to(np.asarray(rgb, np.float32), (size, size, 3)).copy()


def dark_background(size: int, rng: np.random.Generator) -> np.ndarray:
    """The pretraining look: a plain, dark, slightly tinted background."""
    return plain_background(size, rng.uniform(0, 38, size=3))


def gradient_background(size: int, rng: np.random.Generator, lo: float = 40, hi: float = 200) -> np.ndarray:
    """A linear gradient between two random mid-tone colours in a random direction."""
    a, b = rng.uniform(lo, hi, size=3), rng.uniform(lo, hi, size=3)
    return linear_gradient(size, a, b, float(rng.uniform(0, 2 * np.pi)))


def linear_gradient(size: int, a: Sequence[float], b: Sequence[float], angle: float) -> np.ndarray:
    """Colour a fading into colour b along direction `angle` (radians)."""
    t = np.linspace(-1.0, 1.0, size, dtype=np.float32)
    proj = np.cos(angle) * t[None, :] + np.sin(angle) * t[:, None]
    w = ((proj - proj.min()) / max(float(proj.max() - proj.min()), 1e-6))[..., None]
    return (np.asarray(a, np.float32) * (1 - w) + np.asarray(b, np.float32) * w).astype(np.float32)


def noise_background(size: int, rng: np.random.Generator) -> np.ndarray:
    """A mid-tone colour with blocky noise (2 px blocks so it survives downsampling)."""
    base = rng.uniform(50, 150, size=3)
    noise = rng.normal(0, 22, size=(size // 2, size // 2, 1)).astype(np.float32)
    noise = np.repeat(np.repeat(noise, 2, axis=0), 2, axis=1)
    return np.clip(base + noise, 0, 255).astype(np.float32)


def light_background(size: int, rng: np.random.Generator) -> np.ndarray:
    """A plain pale colour (beige, grey, pale blue...): the opposite of the pretraining look."""
    return plain_background(size, rng.uniform(150, 215, size=3))


SHIFTED_BACKGROUNDS = {
    "gradient": gradient_background,
    "noise": noise_background,
    "light": light_background,
}


def contrast_ok(colour: str, background: np.ndarray, min_distance: float = 90.0) -> bool:
    """Whether an object colour stands out from a background's mean colour."""
    mean = background.reshape(-1, 3).mean(axis=0)
    return float(np.linalg.norm(np.asarray(COLOURS[colour], np.float32) - mean)) >= min_distance


# --------------------------------------------------- target-domain backdrops (as specs)
#: the video world's scenes: bright, textured or graded backdrops (pretraining: plain and dark)
BACKDROP_KINDS: Tuple[str, ...] = ("gradient", "noise", "light")


def sample_backdrop(rng: np.random.Generator) -> dict:
    """A backdrop as a small JSON-able spec (kept in the clip's meta; `backdrop_image` draws it)."""
    kind = BACKDROP_KINDS[int(rng.integers(len(BACKDROP_KINDS)))]
    if kind == "gradient":
        return {"kind": kind, "a": [float(v) for v in rng.uniform(40, 200, size=3)],
                "b": [float(v) for v in rng.uniform(40, 200, size=3)], "angle": float(rng.uniform(0, 2 * np.pi))}
    if kind == "noise":
        return {"kind": kind, "base": [float(v) for v in rng.uniform(50, 150, size=3)], "seed": int(rng.integers(2**31))}
    return {"kind": kind, "rgb": [float(v) for v in rng.uniform(150, 215, size=3)]}


def backdrop_image(spec: dict, size: int) -> np.ndarray:
    """(size, size, 3) float32 image of a backdrop spec (a pure function of the spec)."""
    kind = spec["kind"]
    if kind == "gradient":
        return linear_gradient(size, spec["a"], spec["b"], spec["angle"])
    if kind == "noise":
        rng = np.random.default_rng(int(spec["seed"]))
        noise = rng.normal(0, 22, size=(max(size // 2, 1), max(size // 2, 1), 1)).astype(np.float32)
        noise = np.repeat(np.repeat(noise, 2, axis=0), 2, axis=1)[:size, :size]
        return np.clip(np.asarray(spec["base"], np.float32) + noise, 0, 255).astype(np.float32)
    if kind == "light":
        return plain_background(size, spec["rgb"])
    if kind == "dark-gradient":  # the look of generator version 1's video set
        return linear_gradient(size, spec["a"], spec["b"], spec["angle"])
    raise ValueError(f"unknown backdrop kind {kind!r}; expected one of {BACKDROP_KINDS}")

"""How the target-domain camera records a clip: white balance, focus and sensor noise.

The pretraining images are clean renders on plain dark backgrounds. The downstream video
world is filmed "through a camera": each clip gets its own colour cast (per-channel gain,
as an auto white balance that is a little off), a slight defocus blur on some clips, and
fresh sensor noise on every frame. Objects keep their named colours (gains stay within
+-12 %, far from the gaps between the palette's colours), so captions stay true, but the
pixels are not what `xmodal-tiny` saw in pretraining: part of the shift adapting closes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Tuple

import numpy as np


@dataclass(frozen=True)
class Camera:
    gain: Tuple[float, float, float]  # per-channel multiplier (white balance)
    blur: float                        # weight of the 3x3 box blur mixed into each pixel, 0 = sharp
    noise: float                       # std of the per-frame Gaussian sensor noise, in 8-bit levels
    seed: int                          # noise stream of this clip (frame i draws from (seed, i))

    def to_dict(self) -> dict:
        return {"gain": list(self.gain), "blur": self.blur, "noise": self.noise, "seed": self.seed}

    @classmethod
    def from_dict(cls, d: dict) -> "Camera":
        return cls(tuple(float(g) for g in d["gain"]), float(d["blur"]), float(d["noise"]), int(d["seed"]))


def sample_camera(rng: np.random.Generator) -> Camera:
    gain = tuple(float(g) for g in rng.uniform(0.88, 1.12, size=3))
    blur = float(rng.choice([0.0, 0.5])) * float(rng.uniform(0.6, 1.0))
    return Camera(gain, blur, float(rng.uniform(1.0, 3.0)), int(rng.integers(2**31)))


def _box_blur(frames: np.ndarray) -> np.ndarray:
    """3x3 mean over (H, W) with edge replication; frames (T, H, W, 3) float32."""
    p = np.pad(frames, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="edge")
    h, w = frames.shape[1:3]
    return sum(p[:, dy:dy + h, dx:dx + w] for dy in range(3) for dx in range(3)) / 9.0


def film(frames: np.ndarray, camera: Camera) -> np.ndarray:
    """Rendered uint8 (T, H, W, 3) frames -> what the camera records (uint8, same shape)."""
    x = frames.astype(np.float32)
    if camera.blur > 0:
        x = (1.0 - camera.blur) * x + camera.blur * _box_blur(x)
    x = x * np.asarray(camera.gain, np.float32)
    if camera.noise > 0:
        for i in range(x.shape[0]):
            noise = np.random.default_rng([camera.seed, i]).normal(0.0, camera.noise, size=x.shape[1:])
            x[i] += noise.astype(np.float32)
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)

"""Named settings of a method taken from a paper, with the parameter budget the paper prints.

`make_config("adapter_attn", preset="paper")`, `method: {name: adapter_attn, preset: paper}` in a
run config, or `xmodal methods --preset paper` select them. Explicit fields win over the
preset's. Each preset says which budget it reproduces (`paper_count`, on `backbone`) and how
close xmodal's count must be (`tolerance`, absolute: half a unit of the last digit the paper
prints unless `note` says otherwise); tests hold every preset to it.

Sources: "CMA" = Cross-Modal Adapter (Jiang et al.), its tables of baselines on CLIP ViT-B/32
(video: MSR-VTT; image: MSCOCO/Flickr30K); "MSTA" = Chen et al., efficient transfer learning
for video-language foundation models (paper text and the authors' released logs).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from xmodal.errors import XModalError


@dataclass(frozen=True)
class Preset:
    method: str
    name: str
    fields: Dict[str, Any] = field(default_factory=dict)
    paper_count: Optional[int] = None  # trainable parameters as the paper prints them
    tolerance: int = 0  # |xmodal - paper| allowed
    backbone: str = "ViT-B-32"
    source: str = ""
    note: str = ""


PRESETS: Dict[str, Dict[str, Preset]] = {}


def add_preset(preset: Preset) -> Preset:
    PRESETS.setdefault(preset.method, {})[preset.name] = preset
    return preset


def presets_of(method: str) -> Dict[str, Preset]:
    return dict(PRESETS.get(method, {}))


def get_preset(method: str, name: str, source: str = "config") -> Preset:
    known = PRESETS.get(method, {})
    if name not in known:
        raise XModalError(f"{source}: method {method!r} has no preset {name!r}; presets: {sorted(known) or 'none'}")
    return known[name]


def preset_fields(method: str, name: str, source: str = "config") -> Dict[str, Any]:
    return dict(get_preset(method, name, source).fields)


def all_presets() -> List[Preset]:
    return [p for by_name in PRESETS.values() for p in by_name.values()]


# ------------------------------------------------------------------ Cross-Modal Adapter
add_preset(Preset("cross_modal_adapter", "paper", {"r": 8, "d_s": 16}, 500_000, 50_000,
                  source="CMA: r=8, d_s=16, both towers, after attention and MLP (0.5M)",
                  note="519,168 = 0.52M, printed as 0.5M"))
add_preset(Preset("cross_modal_adapter", "paper_r16", {"r": 16, "d_s": 16}, 1_000_000, 50_000,
                  source="CMA: r=16 row of the bottleneck ablation (1.0M)"))
# ---------------------------------------------------------------------- CMA baselines
add_preset(Preset("adapter_attn", "paper", {"r": 64}, 2_000_000, 50_000,
                  source="CMA baseline Adapter-ATTN, video (r=64, 2.0M)"))
add_preset(Preset("adapter_attn", "paper_image", {"r": 16}, 500_000, 50_000,
                  source="CMA baseline Adapter-ATTN, image retrieval (r=16, 0.5M)"))
add_preset(Preset("vpt", "paper", {"n_tokens": 6, "depth": "all"}, 50_000, 10_000,
                  source="CMA baseline VPT, 6 deep visual tokens (0.05M)",
                  note="6 x 768 x 12 = 55,296 = 0.055M, which the paper prints as 0.05M (truncated), "
                       "hence the tolerance of one unit of the last digit"))
add_preset(Preset("vl_prompt", "paper", {"n_text": 4, "n_vision": 6, "text_depth": "all", "vision_depth": "all"},
                  80_000, 5_000,
                  source="CMA baseline VL-Prompt: 6 visual + 4 text deep tokens (0.08M)",
                  note="the paper gives the budget, not the split; 6 visual tokens as its VPT row and "
                       "4 text tokens (CoOp-style) give 79,872"))
add_preset(Preset("maple", "paper", {"n_ctx": 2, "depth": 12}, 4_700_000, 50_000,
                  source="CMA baseline MaPLe, prompt depth 12 (4.7M)",
                  note="MaPLe's own default depth is 9 (3.6M); the CMA table uses depth 12"))
add_preset(Preset("partial", "paper", {"k": 1, "include_head": False}, 10_200_000, 50_000,
                  source="CMA baseline Partial: last block of each tower, without the heads (10.2M)"))
# ------------------------------------------------------------------------------ MSTA
add_preset(Preset("msta", "paper", {"r": 256, "start": 0, "scale": 0.005}, 8_700_000, 50_000,
                  source="MSTA paper: 8.7M trainable (r=256 over all 12 blocks of both towers reproduces it)",
                  note="the paper gives no lambda for this setting; the authors' logs' 0.005 is used"))
add_preset(Preset("msta", "authors", {"r": 128, "start": "auto", "scale": 0.005}, 1_744_000, 0,
                  source="MSTA authors' released logs: r=128 on blocks 8-12, lambda=0.005 (1.744M); "
                         "start 'auto' = the top 5/12 of each tower = blocks 8-12 of 12"))
# ------------------------------------------------------------------------ MV-Adapter
add_preset(Preset("mv_adapter", "paper", {"bottleneck": 64, "scale": 0.1, "layers": "all", "cmt_mode": "down_in",
                                          "patch_temporal": False},
                  None, 0, backbone="ViT-B-16",
                  source="MV-Adapter paper defaults (d'=64, s=0.1, every block, CMT Down-In on the last 2 blocks)",
                  note="no parameter count of the paper is reproduced here"))

__all__ = ["Preset", "PRESETS", "add_preset", "presets_of", "get_preset", "preset_fields", "all_presets"]

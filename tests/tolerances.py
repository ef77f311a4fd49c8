"""Test helper: how far two float computations of one value may differ when only their reduction
order differs (a batch split over processes, another thread count, another GEMM blocking).

Rounding error of a sum of `terms` values of size `magnitude` grows like a random walk:
about eps * magnitude * sqrt(terms); `ulps` is the safety factor. A fixed 1e-6 is not a
tolerance: it is below one ulp for values above 8 (float32), and far above it for small ones.
"""

from __future__ import annotations

import math

import torch


def layout_tolerance(magnitude: float, terms: int, dtype: torch.dtype = torch.float32, ulps: float = 4.0) -> float:
    return ulps * torch.finfo(dtype).eps * abs(magnitude) * math.sqrt(max(1, terms))


def decimal_rounding(x: float, digits: int = 8) -> float:
    """Half a unit of the last of `digits` significant decimal digits (values read back from CSV)."""
    return 0.5 * 10.0 ** (math.floor(math.log10(abs(x))) - digits + 1) if x else 0.0

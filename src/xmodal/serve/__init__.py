"""`xmodal serve`: a search service over indices built by `xmodal index`.

    from xmodal.serve import build_app
    app = build_app(["runs/a/index", "b=runs/b/index"])   # then: uvicorn.run(app)

clip-retrieval's API (`/indices-list`, `/knn-service`, `/metadata`) so its clients work
unchanged, xmodal's `/search` with video moments, media and keyframes, a web page at `/`,
`/healthz` and Prometheus `/metrics`. The library never imports this package.
"""

from __future__ import annotations

from typing import Optional, Sequence

from xmodal.serve.app import create_app
from xmodal.serve.catalog import ServedIndex, load_index, parse_index_args
from xmodal.serve.models import ModelRegistry


def load_indices(specs: Sequence[str], device: str = "cpu", media_root: Optional[str] = None,
                 registry: Optional[ModelRegistry] = None):
    """Load every `DIR` / `NAME=DIR`; indices on the same backbone weights share one backbone."""
    registry = registry or ModelRegistry(device)
    return [load_index(name, directory, registry, media_root) for name, directory in parse_index_args(specs)]


def build_app(specs: Sequence[str], device: str = "cpu", media_root: Optional[str] = None,
              cors_origins: Sequence[str] = ()):
    """The FastAPI app serving the given index folders."""
    return create_app(load_indices(specs, device, media_root), cors_origins=cors_origins)


__all__ = ["build_app", "create_app", "load_indices", "ModelRegistry", "ServedIndex"]

"""`xmodal serve INDEX_DIR [NAME=INDEX_DIR ...]`: a search service and web page over indices.

    xmodal serve runs/msrvtt/index [--host 127.0.0.1] [--port 1234]

Loads each index's model once (indices on the same backbone weights share one backbone and
switch adapters per request), then answers clip-retrieval's `/indices-list`, `/knn-service`
and `/metadata`, xmodal's `/search` (with video moments), `/media`, `/thumb`, `/healthz`,
`/metrics`, and serves a search page at `/`. OpenAPI schema: `/openapi.json`.
"""

from __future__ import annotations

import argparse
import sys


def register(subparsers) -> None:
    p = subparsers.add_parser("serve", help="serve indices over HTTP (API + web page)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("indices", nargs="+", metavar="INDEX_DIR", help="index folder, or NAME=FOLDER to name it")
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=1234)
    p.add_argument("--device", default="cpu", help="device for the query encoders (cpu, cuda)")
    p.add_argument("--media-root", default=None,
                   help="only files inside this folder are served (default: the folder holding all indexed media)")
    p.add_argument("--cors-origin", action="append", default=[], metavar="ORIGIN",
                   help="let a web page from ORIGIN (e.g. a clip-retrieval front end) call the API; repeatable")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import time

    import uvicorn

    from xmodal.errors import XModalError
    from xmodal.serve import create_app, load_indices
    from xmodal.serve.server import uvicorn_config

    if not 0 <= args.port <= 65535:
        raise XModalError(f"--port={args.port}: expected 0..65535")
    t0 = time.perf_counter()
    indices = load_indices(args.indices, device=args.device, media_root=args.media_root)
    app = create_app(indices, cors_origins=args.cors_origin)
    backbones = len({id(ix.encoder.shared) for ix in indices})
    for ix in indices:
        d = ix.describe()
        print(f"  {ix.name}: {d['items']} items ({d['videos']} videos, {d['images']} images), {d['backbone']}"
              f"{' + adapter' if d['adapter'] else ''}, {d['pooling']} pooling"
              f"{'' if d['captions'] else ', no captions (text modality off)'}")
    print(f"loaded {len(indices)} indices on {backbones} backbone(s) in {time.perf_counter() - t0:.1f} s; "
          f"serving http://{args.host}:{args.port}/", flush=True)
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"note: listening on {args.host}: anyone who can reach it can query the indices and read their "
              f"media (no authentication)", file=sys.stderr)
    uvicorn.Server(uvicorn_config(app, host=args.host, port=args.port)).run()
    return 0

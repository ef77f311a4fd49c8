"""Request counts and latency histograms per endpoint, in Prometheus' text exposition format.

An ASGI middleware times every HTTP request and files it under its route template
(`/media/{index}/{item_id}`, never the raw path, so metric cardinality stays bounded);
requests that match no route are filed under `unmatched`.
"""

from __future__ import annotations

import bisect
import threading
import time
from collections import defaultdict
from typing import Dict, List, Tuple

#: histogram bucket upper bounds, seconds
BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


class Metrics:
    def __init__(self):
        self._lock = threading.Lock()
        self.requests: Dict[Tuple[str, str, int], int] = defaultdict(int)
        self.buckets: Dict[Tuple[str, str], List[int]] = {}
        self.sums: Dict[Tuple[str, str], float] = defaultdict(float)
        self.counts: Dict[Tuple[str, str], int] = defaultdict(int)

    def observe(self, method: str, endpoint: str, status: int, seconds: float) -> None:
        key = (method, endpoint)
        with self._lock:
            self.requests[(method, endpoint, status)] += 1
            counts = self.buckets.setdefault(key, [0] * (len(BUCKETS) + 1))
            counts[bisect.bisect_left(BUCKETS, seconds)] += 1
            self.sums[key] += seconds
            self.counts[key] += 1

    def render(self) -> str:
        lines = ["# HELP xmodal_requests_total HTTP requests by method, endpoint and status.",
                 "# TYPE xmodal_requests_total counter"]
        with self._lock:
            for (m, e, s), n in sorted(self.requests.items()):
                lines.append(f'xmodal_requests_total{{method="{m}",endpoint="{_label(e)}",status="{s}"}} {n}')
            lines += ["# HELP xmodal_request_duration_seconds Latency of HTTP requests by endpoint.",
                      "# TYPE xmodal_request_duration_seconds histogram"]
            for (m, e), counts in sorted(self.buckets.items()):
                labels = f'method="{m}",endpoint="{_label(e)}"'
                acc = 0
                for bound, c in zip(BUCKETS + (float("inf"),), counts):
                    acc += c
                    le = "+Inf" if bound == float("inf") else repr(bound)
                    lines.append(f'xmodal_request_duration_seconds_bucket{{{labels},le="{le}"}} {acc}')
                lines.append(f"xmodal_request_duration_seconds_sum{{{labels}}} {self.sums[(m, e)]:.6f}")
                lines.append(f"xmodal_request_duration_seconds_count{{{labels}}} {self.counts[(m, e)]}")
        return "\n".join(lines) + "\n"


class MetricsMiddleware:
    """Pure ASGI middleware (streams file responses untouched) that feeds a `Metrics`."""

    def __init__(self, app, metrics: Metrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = {"code": 500}
        t0 = time.perf_counter()

        async def send_wrapper(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            route = scope.get("route")
            endpoint = getattr(route, "path", None) or "unmatched"
            self.metrics.observe(scope.get("method", "?"), endpoint, status["code"], time.perf_counter() - t0)

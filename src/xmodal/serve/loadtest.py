"""A bounded local load test: N concurrent clients, M requests in all, latency percentiles and errors.

`live_server(app)` runs the app with uvicorn on 127.0.0.1 (a free port) in a thread.

Standard library only (one keep-alive `http.client` connection per client thread), so it
measures the service rather than a client library. Used by tests/test_serve_load.py (a
short run) and benchmarks/serve_speed.py (the full one).
"""

from __future__ import annotations

import contextlib
import http.client
import socket
import json
import threading
import time
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple
from urllib.parse import urlsplit

#: (method, path, JSON body or None)
Request = Tuple[str, str, Optional[Any]]


@dataclass
class LoadResult:
    requests: int
    clients: int
    errors: int
    statuses: Dict[int, int]
    seconds: float
    latencies_ms: List[float]

    def percentile(self, p: float) -> float:
        xs = sorted(self.latencies_ms)
        if not xs:
            return float("nan")
        i = min(len(xs) - 1, max(0, int(round(p / 100.0 * (len(xs) - 1)))))
        return xs[i]

    def summary(self) -> Dict[str, Any]:
        return {"requests": self.requests, "clients": self.clients, "errors": self.errors,
                "statuses": {str(k): v for k, v in sorted(self.statuses.items())},
                "seconds": round(self.seconds, 3), "throughput_rps": round(self.requests / self.seconds, 1),
                "p50_ms": round(self.percentile(50), 2), "p90_ms": round(self.percentile(90), 2),
                "p99_ms": round(self.percentile(99), 2), "max_ms": round(max(self.latencies_ms), 2)}


def run_load(base_url: str, requests: Sequence[Request], total: int = 1000, clients: int = 8,
             timeout: float = 60.0) -> LoadResult:
    """Send `total` requests (cycling through `requests`) from `clients` threads; errors = non-2xx or failures."""
    parts = urlsplit(base_url)
    lock = threading.Lock()
    counter = {"next": 0}
    latencies: List[float] = []
    statuses: Dict[int, int] = {}
    errors = [0]

    def take() -> Optional[int]:
        with lock:
            i = counter["next"]
            if i >= total:
                return None
            counter["next"] = i + 1
            return i

    def client() -> None:
        conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
        try:
            while (i := take()) is not None:
                method, path, body = requests[i % len(requests)]
                data = json.dumps(body).encode() if body is not None else None
                headers = {"Content-Type": "application/json"} if data is not None else {}
                t0 = time.perf_counter()
                try:
                    conn.request(method, path, body=data, headers=headers)
                    resp = conn.getresponse()
                    resp.read()
                    status = resp.status
                except (OSError, http.client.HTTPException):
                    conn.close()
                    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
                    status = -1
                dt = (time.perf_counter() - t0) * 1000
                with lock:
                    latencies.append(dt)
                    statuses[status] = statuses.get(status, 0) + 1
                    if not 200 <= status < 300:
                        errors[0] += 1
        finally:
            conn.close()

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client, daemon=True) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return LoadResult(requests=len(latencies), clients=clients, errors=errors[0], statuses=statuses,
                      seconds=time.perf_counter() - t0, latencies_ms=latencies)


@contextlib.contextmanager
def live_server(app, timeout: float = 30.0) -> Iterator[str]:
    """Yield the base URL (http://127.0.0.1:PORT) while the server runs; stop it afterwards."""
    import uvicorn

    from xmodal.serve.server import uvicorn_config

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn_config(app, lifespan="off", timeout_keep_alive=30))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout)
        sock.close()

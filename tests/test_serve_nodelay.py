"""`xmodal serve` turns Nagle's algorithm off on its connections.

Without it, on a listening socket of protocol 0 (as `live_server` made it), uvicorn's two writes
per response (headers, then body) met the client's delayed ACK and every keep-alive search waited
40 ms more than its handler (serve_speed.py: 79.5 ms p50 at 100k videos with the handler at 33 ms).
"""

from __future__ import annotations

import http.client
import socket

import pytest

pytest.importorskip("uvicorn")
pytest.importorskip("fastapi")

from fastapi import FastAPI  # noqa: E402

from xmodal.serve import server as nodelay  # noqa: E402
from xmodal.serve.loadtest import live_server  # noqa: E402


def test_a_connection_accepted_from_a_plain_listener_keeps_nagle_until_set_nodelay():
    listener = socket.socket()  # protocol 0, as uvicorn's bind_socket makes it: asyncio leaves Nagle on
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    client = socket.create_connection(listener.getsockname())
    conn, _ = listener.accept()
    try:
        assert conn.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 0
        assert nodelay.set_nodelay(conn) is True
        assert conn.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
    finally:
        for s in (conn, client, listener):
            s.close()


def test_set_nodelay_leaves_non_tcp_sockets_alone():
    a, b = socket.socketpair()
    try:
        assert nodelay.set_nodelay(a) is False
        assert nodelay.set_nodelay(None) is False
    finally:
        a.close()
        b.close()


def test_every_connection_of_the_served_app_has_nodelay(monkeypatch):
    seen = []
    original = nodelay.set_nodelay

    def spy(sock):
        result = original(sock)
        seen.append((result, sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)))
        return result

    monkeypatch.setattr(nodelay, "set_nodelay", spy)
    app = FastAPI()

    @app.get("/big")
    def big():
        return {"pad": "y" * 6000}

    with live_server(app) as base:
        host, port = base.rsplit("/", 1)[-1].split(":")
        for _ in range(2):  # two connections
            conn = http.client.HTTPConnection(host, int(port), timeout=10)
            for _ in range(3):
                conn.request("GET", "/big")
                response = conn.getresponse()
                assert response.status == 200 and len(response.read()) > 6000
            conn.close()
    assert len(seen) == 2 and all(ok and flag != 0 for ok, flag in seen)


def test_the_cli_and_live_server_use_the_no_delay_protocol():
    config = nodelay.uvicorn_config(FastAPI(), host="127.0.0.1", port=0)
    assert config.http is nodelay.NoDelayH11Protocol

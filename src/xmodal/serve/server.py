"""Running the app under uvicorn with Nagle's algorithm off on every connection.

uvicorn's h11 protocol writes a response's headers and its body as two separate socket writes.
asyncio only disables Nagle (TCP_NODELAY) on sockets whose protocol number is IPPROTO_TCP. When
uvicorn binds host:port itself, asyncio makes the socket and all is well; but a listening socket
made with `socket.socket()` has protocol 0 (uvicorn's `bind_socket`, used for several workers or reload mode,
or a socket handed to `Server.run(sockets=...)`, as `loadtest.live_server` does), and its
connections keep Nagle on: the body then waits for the client's delayed ACK of the headers, 40 ms
on Linux, on every keep-alive request after the first few. Measured on 127.0.0.1 with a 6 KB JSON
response and a 20 ms handler: 64 ms per request on such a socket, 21 ms with TCP_NODELAY (and 21 ms
when uvicorn binds host:port). `NoDelayH11Protocol` turns Nagle off when a connection is made,
whatever created the socket.
"""

from __future__ import annotations

import socket
from typing import Any

from uvicorn.protocols.http.h11_impl import H11Protocol


class NoDelayH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with TCP_NODELAY set on each TCP connection."""

    def connection_made(self, transport) -> None:  # type: ignore[override]
        set_nodelay(transport.get_extra_info("socket"))
        super().connection_made(transport)


def set_nodelay(sock: Any) -> bool:
    """TCP_NODELAY on a TCP socket (True when set); Unix sockets and others are left alone."""
    if sock is None or getattr(sock, "family", None) not in (socket.AF_INET, socket.AF_INET6):
        return False
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except OSError:
        return False
    return True


def uvicorn_config(app, **kwargs):
    """`uvicorn.Config` for the service: the no-delay h11 protocol, quiet logs unless asked."""
    import uvicorn

    kwargs.setdefault("log_level", "warning")
    return uvicorn.Config(app, http=NoDelayH11Protocol, **kwargs)

"""A small HTTP/1.1 server on trio for /metrics, the status page and /api/status.

:func:`parse_request` is the sans-IO part: it takes the bytes read so far and says whether the
request head is complete, answers with a typed :class:`HttpError` when it is malformed or over
:data:`MAX_REQUEST` bytes, and gives the method and path otherwise. :func:`respond` maps a
request to a status, content type and body. :func:`serve_http` is the thin trio driver: one
request per connection (``Connection: close``), a read deadline, at most :data:`MAX_CLIENTS`
connections at once (others are closed at once), GET and HEAD only.

Paths: ``/metrics`` (Prometheus text), ``/`` (the status page, one HTML file with inline script
and style that polls ``/api/status``), ``/api/status`` (JSON: :meth:`Observer.status`).

Imports trio, :mod:`p2pcompute.observe.view`, :mod:`p2pcompute.observe.metrics` and errors.
"""

from __future__ import annotations

import json
import logging
import socket
import time
from dataclasses import dataclass
from importlib import resources
from typing import Any

import trio
import trio.lowlevel

from p2pcompute.errors import ConfigError
from p2pcompute.observe.metrics import CONTENT_TYPE, metrics_text, node_registry
from p2pcompute.observe.view import Observer

log = logging.getLogger(__name__)

#: The largest request head we read (request line and headers); bigger ones get 431.
MAX_REQUEST = 8192
#: Connections served at once; more are closed without an answer.
MAX_CLIENTS = 32
#: Seconds a client has to send its request head.
READ_TIMEOUT = 10.0
#: Seconds a client has to take the answer.
WRITE_TIMEOUT = 30.0

_REASONS = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
}


class HttpError(Exception):
    """A request we refuse: ``status`` is the HTTP status to answer with."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Request:
    """A parsed request line: method (upper case), path (no query string), the HTTP version."""

    method: str
    path: str
    version: str


def parse_request(data: bytes) -> Request | None:
    """The request whose head ``data`` holds, or ``None`` while the head is incomplete.

    Raises :class:`HttpError` (400, 405 or 431) for a request we will not serve.

    Example::

        >>> parse_request(b"GET /metrics?x=1 HTTP/1.1\\r\\nHost: a\\r\\n\\r\\n")
        Request(method='GET', path='/metrics', version='HTTP/1.1')
        >>> parse_request(b"GET / HTTP/1.1\\r\\n") is None
        True
    """
    end = data.find(b"\r\n\r\n")
    if end < 0:
        if len(data) > MAX_REQUEST:
            raise HttpError(431, f"request head over {MAX_REQUEST} bytes")
        return None
    if end + 4 > MAX_REQUEST:
        raise HttpError(431, f"request head over {MAX_REQUEST} bytes")
    line = data[: data.find(b"\r\n")]
    try:
        text = line.decode("ascii")
    except UnicodeDecodeError:
        raise HttpError(400, "request line is not ASCII") from None
    parts = text.split(" ")
    if len(parts) != 3 or not parts[1].startswith("/") or not parts[2].startswith("HTTP/1."):
        raise HttpError(400, "malformed request line")
    method, target, version = parts
    if method not in ("GET", "HEAD"):
        raise HttpError(405, f"method {method[:16]!r} not allowed")
    return Request(method, target.split("?", 1)[0].split("#", 1)[0], version)


def status_page() -> bytes:
    """The status page (``status.html`` beside this module).

    Example::

        assert b"/api/status" in status_page()
    """
    return resources.files("p2pcompute.observe").joinpath("status.html").read_bytes()


def respond(observer: Observer, registry: Any, request: Request) -> tuple[int, str, bytes]:
    """Status, content type and body for ``request``.

    Example::

        status, ctype, body = respond(observer, node_registry(observer), Request("GET", "/", "HTTP/1.1"))
    """
    if request.path == "/metrics":
        return 200, CONTENT_TYPE, metrics_text(registry)
    if request.path == "/api/status":
        body = json.dumps(observer.status(), sort_keys=True).encode()
        return 200, "application/json", body
    if request.path in ("/", "/index.html"):
        return 200, "text/html; charset=utf-8", status_page()
    return 404, "text/plain; charset=utf-8", b"not found: try /, /metrics or /api/status\n"


def _response(status: int, ctype: str, body: bytes, *, head: bool = False) -> bytes:
    lines = [
        f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}",
        f"Content-Type: {ctype}",
        f"Content-Length: {len(body)}",
        "Cache-Control: no-store",
        "X-Content-Type-Options: nosniff",
        "Connection: close",
        "",
        "",
    ]
    return "\r\n".join(lines).encode("ascii") + (b"" if head else body)


async def _lag() -> float:
    """Seconds until the scheduler comes back to us after a checkpoint: the event loop's lag."""
    t0 = time.perf_counter()
    await trio.lowlevel.checkpoint()
    return time.perf_counter() - t0


class HttpServer:
    """Serves one :class:`Observer` over HTTP; create with :func:`serve_http` (``nursery.start``)."""

    def __init__(self, observer: Observer) -> None:
        self.observer = observer
        self.registry = node_registry(observer)
        self._clients = trio.CapacityLimiter(MAX_CLIENTS)

    async def handle(self, stream: trio.abc.Stream) -> None:
        """Answer one request on ``stream`` and close it."""
        try:
            self._clients.acquire_nowait()
        except trio.WouldBlock:
            await trio.aclose_forcefully(stream)
            return
        try:
            async with stream:
                await self._answer(stream)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass  # the client went away
        finally:
            self._clients.release()

    async def _answer(self, stream: trio.abc.Stream) -> None:
        data = b""
        request: Request | None = None
        with trio.move_on_after(READ_TIMEOUT):
            try:
                while request is None:
                    chunk = await stream.receive_some(4096)
                    if not chunk:
                        return
                    data += chunk
                    request = parse_request(data)
            except HttpError as exc:
                body = f"{exc}\n".encode()
                await stream.send_all(_response(exc.status, "text/plain; charset=utf-8", body))
                return
        if request is None:
            return  # too slow: dropped
        self.observer.loop_lag = await _lag()
        try:
            status, ctype, body = respond(self.observer, self.registry, request)
        except Exception:
            log.exception("status server failed on %s", request.path)
            status, ctype, body = 500, "text/plain; charset=utf-8", b"internal error\n"
        with trio.move_on_after(WRITE_TIMEOUT):  # a client that does not read loses its slot
            await stream.send_all(_response(status, ctype, body, head=request.method == "HEAD"))


def check_bindable(host: str, port: int) -> None:
    """Raise :class:`ConfigError` unless ``host:port`` can be listened on now (before a node joins).

    Example::

        check_bindable("127.0.0.1", 9100)
    """
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        family, kind, proto, _, addr = infos[0]
        with socket.socket(family, kind, proto) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # what trio's listener sets
            sock.bind(addr)
    except OSError as exc:
        raise ConfigError(f"cannot serve HTTP on {host}:{port}: {exc.strerror or exc}") from None


def parse_host_port(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[v6]:PORT`` for IPv6) as a pair; :class:`ValueError` when malformed.

    Example::

        >>> parse_host_port("127.0.0.1:9100")
        ('127.0.0.1', 9100)
        >>> parse_host_port("[::1]:0")
        ('::1', 0)
    """
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"expected HOST:PORT, got {text!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ValueError(f"write an IPv6 address in brackets: [{host}]:{port}")
    value = int(port)
    if value > 65535:
        raise ValueError(f"port {value} is over 65535")
    return host, value


async def serve_http(
    observer: Observer,
    host: str,
    port: int,
    *,
    task_status: Any = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve /metrics, / and /api/status for ``observer`` on ``host:port`` until cancelled.

    Started with ``await nursery.start(serve_http, observer, host, port)``, which returns the
    bound ``(host, port)`` (port 0 picks a free one). A port in use or an address this machine
    does not have raises :class:`ConfigError`.

    Example::

        host, port = await nursery.start(serve_http, observer, "127.0.0.1", 0)
        print(f"http://{host}:{port}/metrics")
    """
    server = HttpServer(observer)
    try:
        listeners = await trio.open_tcp_listeners(port, host=host)
    except OSError as exc:
        raise ConfigError(f"cannot serve HTTP on {host}:{port}: {exc.strerror or exc}") from None
    sockname = listeners[0].socket.getsockname()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(trio.serve_listeners, server.handle, listeners)
        task_status.started((host, int(sockname[1])))


__all__ = [
    "MAX_CLIENTS",
    "MAX_REQUEST",
    "HttpError",
    "HttpServer",
    "Request",
    "check_bindable",
    "parse_host_port",
    "parse_request",
    "respond",
    "serve_http",
    "status_page",
]

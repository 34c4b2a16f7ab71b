"""The metrics listener's HTTP: /healthz and /readyz for orchestrators, Prometheus on the rest.

prometheus-client's own server cannot route, so the same threaded WSGI server it
uses is built here around its metrics app.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable, Iterable
from socketserver import ThreadingMixIn
from typing import Any, Protocol
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app

HEALTHZ = "/healthz"
READYZ = "/readyz"

StartResponse = Callable[..., Any]
App = Callable[[dict[str, Any], StartResponse], Iterable[bytes]]


class Health(Protocol):
    """What the probes ask the service; called from the HTTP server's thread."""

    def healthy(self) -> bool:
        """Liveness: the scheduler keeps sweeping (the systemd watchdog ping's judgement)."""
        ...

    def ready(self) -> bool:
        """Readiness: the policies are loaded and every target has been swept once."""
        ...


def _probe(ok: bool, yes: bytes, no: bytes, environ: dict[str, Any], start: StartResponse
           ) -> Iterable[bytes]:
    body = yes if ok else no
    start(
        "200 OK" if ok else "503 Service Unavailable",
        [
            ("Content-Type", "text/plain; charset=utf-8"),
            ("Content-Length", str(len(body))),
            ("Cache-Control", "no-store"),
        ],
    )
    return [b""] if environ.get("REQUEST_METHOD") == "HEAD" else [body]


def make_app(registry: CollectorRegistry, health: Health | None) -> App:
    """/healthz and /readyz answer 200 or 503 (404 without a service); the rest is Prometheus's."""
    metrics: App = make_wsgi_app(registry)

    def app(environ: dict[str, Any], start: StartResponse) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if path not in (HEALTHZ, READYZ) or environ.get("REQUEST_METHOD") not in ("GET", "HEAD"):
            return metrics(environ, start)
        if health is None:
            start("404 Not Found", [("Content-Type", "text/plain; charset=utf-8")])
            return [b"no service behind this listener\n"]
        if path == HEALTHZ:
            return _probe(
                health.healthy(),
                b"ok: sweeps are running\n",
                b"unhealthy: sweeps are not completing (see the log)\n",
                environ,
                start,
            )
        return _probe(
            health.ready(),
            b"ready: policies loaded, every target reached\n",
            b"not ready: not every target has been reached yet\n",
            environ,
            start,
        )

    return app


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass  # one line per scrape or probe would drown the events that matter


def serve(
    host: str, port: int, registry: CollectorRegistry, health: Health | None
) -> tuple[WSGIServer, threading.Thread]:
    """Listen on host:port (IPv4 or IPv6) in a daemon thread; OSError if it cannot bind."""
    family, *_, sockaddr = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]

    class Server(_Server):
        address_family = family

    server = make_server(
        str(sockaddr[0]), port, make_app(registry, health), Server, _QuietHandler
    )
    thread = threading.Thread(target=server.serve_forever, name="metrics-http", daemon=True)
    thread.start()
    return server, thread

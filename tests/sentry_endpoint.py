"""A stand-in for Sentry's ingestion endpoint, for tests: nothing leaves the machine.

``SentryEndpoint`` is a real HTTP server on 127.0.0.1 (a free port) in a
background thread. The real sentry-sdk posts envelopes to it through its
ordinary transport; it decompresses them (gzip, or brotli when the module is
there), parses the envelope format and keeps every item:

    with SentryEndpoint() as sentry:
        sentry_sdk.init(dsn=sentry.dsn, ...)
        sentry_sdk.capture_message("hello")
        [event] = sentry.wait_events()
        assert event["message"] == "hello"

``bodies`` keeps each decompressed envelope as bytes, for checks that a
string appears nowhere at all. ``SentryEndpoint(delay=0.4)`` answers each request
that much later, as a distant Sentry does (the envelope is stored on arrival).
"""

from __future__ import annotations

import gzip
import json
import re
import sys
import threading
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any, TypeVar

__all__ = ["Envelope", "Item", "SentryEndpoint", "parse_envelope"]

T = TypeVar("T")
_PATH = re.compile(r"^/api/(?P<project>[^/]+)/envelope/?$")


@dataclass(frozen=True)
class Item:
    """One envelope item: its header (``type``, ``length``, ...) and raw payload."""

    headers: dict[str, Any]
    payload: bytes

    @property
    def type(self) -> str:
        return str(self.headers.get("type", ""))

    def json(self) -> Any:
        return json.loads(self.payload)


@dataclass(frozen=True)
class Envelope:
    """One POSTed envelope."""

    project: str
    headers: dict[str, Any]
    items: tuple[Item, ...]
    body: bytes  # decompressed


def parse_envelope(body: bytes, project: str = "") -> Envelope:
    """Parse Sentry's envelope format: a header line, then item header + payload pairs."""
    first, _, rest = body.partition(b"\n")
    headers = json.loads(first)
    items = []
    pos = 0
    while pos < len(rest):
        end = rest.find(b"\n", pos)
        line = rest[pos : end if end >= 0 else len(rest)]
        pos = end + 1 if end >= 0 else len(rest)
        if not line.strip():
            continue
        item_headers = json.loads(line)
        length = item_headers.get("length")
        if length is not None:
            payload = rest[pos : pos + length]
            pos += length
            if rest[pos : pos + 1] == b"\n":
                pos += 1
        else:
            end = rest.find(b"\n", pos)
            payload = rest[pos : end if end >= 0 else len(rest)]
            pos = end + 1 if end >= 0 else len(rest)
        items.append(Item(item_headers, payload))
    return Envelope(project, headers, tuple(items), body)


def _decompress(body: bytes, encoding: str) -> bytes:
    encoding = encoding.strip().lower()
    if encoding in ("", "identity"):
        return body
    if encoding == "gzip":
        return gzip.decompress(body)
    if encoding == "deflate":
        return zlib.decompress(body)
    if encoding == "br":
        import brotli  # type: ignore[import-not-found]  # sentry-sdk only uses it when present

        result: bytes = brotli.decompress(body)
        return result
    raise ValueError(f"unsupported Content-Encoding {encoding!r}")


class _Server(ThreadingHTTPServer):
    def handle_error(self, request: Any, client_address: Any) -> None:
        if isinstance(sys.exc_info()[1], ConnectionError):
            return  # the client went away while answered late (a stopped watchdog): no news
        super().handle_error(request, client_address)


class SentryEndpoint:
    """A local HTTP server that records the envelopes sentry-sdk sends to it."""

    def __init__(self, delay: float = 0.0) -> None:
        self.delay = delay
        self.envelopes: list[Envelope] = []
        self.errors: list[str] = []  # requests it could not take, with the reason
        self._changed = threading.Condition()
        endpoint = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as the SDK's connection pool expects

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length)
                match = _PATH.match(self.path.split("?", 1)[0])
                if match is None:
                    endpoint._reject(f"POST {self.path}: not an envelope URL")
                    self._answer(404, b'{"detail":"not found"}')
                    return
                try:
                    body = _decompress(raw, self.headers.get("Content-Encoding", ""))
                    envelope = parse_envelope(body, match["project"])
                except Exception as exc:
                    endpoint._reject(f"POST {self.path}: {type(exc).__name__}: {exc}")
                    self._answer(400, b'{"detail":"bad envelope"}')
                    return
                endpoint._store(envelope)
                if endpoint.delay:
                    time.sleep(endpoint.delay)  # the SDK's worker waits for the answer
                event_id = envelope.headers.get("event_id")
                self._answer(200, json.dumps({"id": event_id}).encode())

            def _answer(self, status: int, body: bytes) -> None:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass  # quiet: tests read what was stored, not the access log

        self._server = _Server(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.port: int = self._server.server_address[1]
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="sentry-endpoint", daemon=True
        )
        self._thread.start()

    @property
    def dsn(self) -> str:
        return f"http://publickey@127.0.0.1:{self.port}/1"

    def _store(self, envelope: Envelope) -> None:
        with self._changed:
            self.envelopes.append(envelope)
            self._changed.notify_all()

    def _reject(self, why: str) -> None:
        with self._changed:
            self.errors.append(why)
            self._changed.notify_all()

    # -- reading what arrived --------------------------------------------------

    def items(self, type: str | None = None) -> list[Item]:
        with self._changed:
            envelopes = list(self.envelopes)
        return [i for e in envelopes for i in e.items if type is None or i.type == type]

    def events(self) -> list[dict[str, Any]]:
        """Error/message events, in arrival order."""
        return [i.json() for i in self.items("event")]

    def checkins(self) -> list[dict[str, Any]]:
        """Cron check-ins, in arrival order."""
        return [i.json() for i in self.items("check_in")]

    def bodies(self) -> list[bytes]:
        """Every decompressed envelope."""
        with self._changed:
            return [e.body for e in self.envelopes]

    def clear(self) -> None:
        with self._changed:
            self.envelopes.clear()
            self.errors.clear()

    def wait_for(self, predicate: Callable[[], T], timeout: float = 5.0) -> T:
        """Wait until ``predicate()`` is truthy (checked whenever an envelope arrives); its value.

        AssertionError after ``timeout`` seconds. Blocks the calling thread, not the server.
        """
        with self._changed:
            result = self._changed.wait_for(predicate, timeout)
        if not result:
            raise AssertionError(
                f"timed out after {timeout:g}s waiting for {predicate!r}; "
                f"got {len(self.envelopes)} envelopes, errors {self.errors}"
            )
        return result

    def wait_events(self, n: int = 1, timeout: float = 5.0) -> list[dict[str, Any]]:
        """The events, once at least ``n`` have arrived."""
        self.wait_for(lambda: len(self.events()) >= n, timeout)
        return self.events()

    def wait_checkins(self, n: int = 1, timeout: float = 5.0) -> list[dict[str, Any]]:
        """The check-ins, once at least ``n`` have arrived."""
        self.wait_for(lambda: len(self.checkins()) >= n, timeout)
        return self.checkins()

    # -- lifecycle -------------------------------------------------------------

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def __enter__(self) -> SentryEndpoint:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

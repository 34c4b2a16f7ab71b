"""Django test app: its own persistent connections (one per thread), requests served by Django's
real WSGI handler, so request_started/request_finished run its connection housekeeping."""

from __future__ import annotations

import itertools
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any
from urllib.parse import urlsplit
from wsgiref.util import setup_testing_defaults

import django
from django.conf import settings as django_settings
from django.core.handlers.wsgi import WSGIHandler
from django.db import connection
from django.http import HttpRequest, HttpResponse
from django.urls import path
from protocol import run, settings

dsn, size, recipe, naming = settings()
url = urlsplit(dsn)
# The app's own setting: persistent connections (CONN_MAX_AGE=None), as pooled Django deployments
# run; the advised lines (assignments to DATABASES) add theirs.
DATABASES: dict[str, dict[str, Any]] = {"default": {
    "ENGINE": "django.db.backends.postgresql", "NAME": url.path.lstrip("/"),
    "USER": url.username, "HOST": url.hostname, "PORT": url.port, "CONN_MAX_AGE": None,
}}
for line in (naming, recipe):
    if line:
        exec(line, {"DATABASES": DATABASES})
django_settings.configure(DEBUG=False, ALLOWED_HOSTS=["*"], ROOT_URLCONF=__name__,
                          DATABASES=DATABASES, USE_TZ=True)
django.setup()
warming = threading.Barrier(size)


def pid_view(request: HttpRequest) -> HttpResponse:
    with connection.cursor() as cur:
        cur.execute("SELECT pg_backend_pid()")
        pid = cur.fetchone()[0]
    warming.wait(30)  # every thread holds its own connection at once
    return HttpResponse(str(pid))


def query_view(request: HttpRequest) -> HttpResponse:
    with connection.cursor() as cur:
        cur.execute("SELECT 1")
        cur.fetchone()
    return HttpResponse("ok")


urlpatterns = [path("pid", pid_view), path("query", query_view)]
handler = WSGIHandler()
# One thread per connection, requests dealt round-robin: each thread's first request after the
# kill meets its own killed connection.
threads = [ThreadPoolExecutor(max_workers=1) for _ in range(size)]
served = itertools.count()


def get(route: str) -> str:
    environ: dict[str, Any] = {"PATH_INFO": f"/{route}"}
    setup_testing_defaults(environ)
    status: list[str] = []
    response = handler(environ, lambda s, headers: status.append(s))
    try:
        body = b"".join(response).decode()
    finally:
        response.close()  # request_finished: Django closes unusable or too old connections
    if not status[0].startswith("200"):
        raise RuntimeError(f"HTTP {status[0]}")
    return body


def warm(n: int) -> list[int]:
    pending = [t.submit(get, "pid") for t in threads[:n]]
    return [int(f.result()) for f in pending]


def request() -> None:
    threads[next(served) % size].submit(get, "query").result()


def close() -> None:
    for t in threads:
        t.shutdown()


run(warm, request, size, close)

"""Tiny misbehaving servers on 127.0.0.1 for storage tests: one that accepts and never answers, one that answers
what a test scripts (403, 503, an S3 error document, an endless body)."""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@contextmanager
def silent_tcp_server() -> Iterator[str]:
    """``http://127.0.0.1:<port>``: accepts connections, reads nothing, answers nothing, until the test ends."""
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(0.1)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except OSError:  # timeout: look at stop again
                continue
            held.append(conn)

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.getsockname()[1]}"
    finally:
        stop.set()
        thread.join(5)
        for conn in held:
            conn.close()
        server.close()


@dataclass
class Reply:
    status: int = 200
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    endless: bool = False  # stream zeros without a Content-Length until the client hangs up


@dataclass
class ScriptedServer:
    """``url``: the base URL; ``hits``: (method, path) of every request; ``answer`` decides each reply."""

    url: str
    answer: Callable[[str, str, int], Reply]
    hits: list[tuple[str, str]] = field(default_factory=list)

    def count(self, method: str | None = None) -> int:
        return sum(1 for m, _ in self.hits if method is None or m == method)


def s3_error(code: str, status: int, message: str = "scripted") -> Reply:
    """An S3-style XML error document, as a real store sends for GET/PUT (HEAD carries only the status)."""
    body = f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code><Message>{message}</Message></Error>'
    return Reply(status, body.encode(), {"Content-Type": "application/xml"})


@contextmanager
def scripted_http_server(answer: Callable[[str, str, int], Reply]) -> Iterator[ScriptedServer]:
    """An HTTP server; its reply to the n-th request (from 0) for ``(method, path)`` is ``answer(method, path, n)``."""
    box: list[ScriptedServer] = []

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: object) -> None:  # quiet
            pass

        def _reply(self, method: str) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            if length:
                self.rfile.read(length)
            srv = box[0]
            path = self.path.split("?", 1)[0]
            n = sum(1 for hit in srv.hits if hit == (method, path))
            srv.hits.append((method, path))
            reply = srv.answer(method, path, n)
            self.send_response(reply.status)
            for key, value in reply.headers.items():
                self.send_header(key, value)
            if reply.endless:
                self.send_header("Connection", "close")
                self.end_headers()
                chunk = b"\0" * 65536
                try:
                    for _ in range(100_000):  # 6.5 GB at most: bounded even if a client never stops
                        self.wfile.write(chunk)
                except OSError:
                    pass
                self.close_connection = True
                return
            self.send_header("Content-Length", str(len(reply.body)))
            self.end_headers()
            if method != "HEAD":
                self.wfile.write(reply.body)

        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            self._reply("GET")

        def do_HEAD(self) -> None:  # noqa: N802
            self._reply("HEAD")

        def do_PUT(self) -> None:  # noqa: N802
            self._reply("PUT")

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    server = ScriptedServer(url=f"http://127.0.0.1:{httpd.server_address[1]}", answer=answer)
    box.append(server)
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(5)

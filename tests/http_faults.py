"""A loopback HTTP server whose paths misbehave the way real stores do (issue 26, section 2).

Paths (``NAME`` is a file of the served folder):

- ``/ok/NAME``: the file, Range ignored (a plain 200 with the whole body);
- ``/stall/NAME``: the request is read and never answered;
- ``/trickle/NAME``: headers, then one byte every ``trickle_every_s``;
- ``/reset-N/NAME``: the first N requests end with a TCP reset, the next ones get the file;
- ``/busy-N/NAME``: the first N requests get 503 (throttling), the next ones the file;
- ``/huge``: a 200 with a ``huge_bytes`` body whatever the Range (``sent['/huge']`` counts the
  bytes it could send before the client hung up);
- anything else: 404.

Only 127.0.0.1; every loop is bounded by ``lifetime_s``, after which the server stops itself,
and :meth:`FaultServer.close` (or leaving the ``with`` block) stops it at once.
"""

from __future__ import annotations

import collections
import socket
import socketserver
import struct
import threading
import time
from pathlib import Path


class FaultServer:
    def __init__(self, folder: Path, *, lifetime_s: float = 300.0, trickle_every_s: float = 0.5,
                 huge_bytes: int = 64 * 1024**2):
        self.folder = folder
        self.lifetime_s = lifetime_s
        self.trickle_every_s = trickle_every_s
        self.huge_bytes = huge_bytes
        self.requests: collections.Counter[str] = collections.Counter()
        self.sent: collections.Counter[str] = collections.Counter()
        self.ranges: list[str | None] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._deadline = time.monotonic() + lifetime_s
        owner = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self):
                owner._handle(self.request)

        socketserver.ThreadingTCPServer.allow_reuse_address = True
        self._server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.base = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self):
        self._server.timeout = 0.2
        while not self._stop.is_set() and time.monotonic() < self._deadline:
            self._server.handle_request()
        self._stop.set()

    def close(self):
        self._stop.set()
        self._thread.join(timeout=5)
        self._server.server_close()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()

    def _wait(self, seconds: float) -> bool:
        """Sleep; False when the server is stopping."""
        return not self._stop.wait(min(seconds, max(0.0, self._deadline - time.monotonic())))

    def _handle(self, connection: socket.socket) -> None:
        connection.settimeout(5)
        request = b""
        while b"\r\n\r\n" not in request and len(request) < 65536:
            chunk = connection.recv(4096)
            if not chunk:
                return
            request += chunk
        lines = request.decode("latin-1").split("\r\n")
        path = lines[0].split(" ")[1].split("?", 1)[0]
        headers = {line.split(":", 1)[0].lower(): line.split(":", 1)[1].strip() for line in lines[1:] if ":" in line}
        with self._lock:
            self.requests[path] += 1
            count = self.requests[path]
            self.ranges.append(headers.get("range"))
        kind, _, name = path.lstrip("/").partition("/")
        try:
            if kind == "stall":
                while self._wait(0.2):
                    pass
            elif kind == "trickle":
                connection.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\nConnection: close\r\n\r\n")
                while self._wait(self.trickle_every_s):
                    connection.sendall(b"\xff")
            elif kind.startswith("reset-") and count <= int(kind.split("-")[1]):
                connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                connection.close()  # with a zero linger: a TCP reset, not a clean end
            elif kind.startswith("busy-") and count <= int(kind.split("-")[1]):
                connection.sendall(b"HTTP/1.1 503 Slow Down\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            elif kind == "huge":
                self._send_huge(connection, path)
            elif kind in ("ok", "stall", "trickle") or kind.startswith(("reset-", "busy-")):
                file = self.folder / name
                if not name or not file.is_file():
                    self._send(connection, 404, b"")
                else:
                    self._send(connection, 200, file.read_bytes())
            else:
                self._send(connection, 404, b"")
        except OSError:
            pass  # the client hung up

    @staticmethod
    def _send(connection, status: int, body: bytes) -> None:
        reason = {200: "OK", 404: "Not Found"}[status]
        connection.sendall(f"HTTP/1.1 {status} {reason}\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n"
                           .encode() + body)

    def _send_huge(self, connection, path: str) -> None:
        connection.sendall(f"HTTP/1.1 200 OK\r\nContent-Length: {self.huge_bytes}\r\nConnection: close\r\n\r\n".encode())
        block = b"\xff\xd8\xff" + b"\0" * (65536 - 3)
        left = self.huge_bytes
        while left > 0 and not self._stop.is_set():
            piece = block[:left]
            connection.sendall(piece)
            left -= len(piece)
            with self._lock:
                self.sent[path] += len(piece)

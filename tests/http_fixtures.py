"""A loopback HTTP server with good images and every way a fetch can go wrong."""

from __future__ import annotations

import http.server
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager


def make_handler(images: dict[str, bytes]) -> type[http.server.BaseHTTPRequestHandler]:
    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def do_GET(self) -> None:  # noqa: N802
            try:
                self._respond()
            except (BrokenPipeError, ConnectionResetError):
                pass  # the fetcher gave up, as its limits tell it to

        def _send(self, status: int, body: bytes, ctype: str = "image/jpeg") -> None:
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _respond(self) -> None:
            path = self.path.split("?")[0]
            if path.startswith("/img/") and path[5:] in images:
                self._send(200, images[path[5:]])
            elif path == "/status/404":
                self._send(404, b"not found", "text/plain")
            elif path == "/status/403":
                self._send(403, b"forbidden", "text/plain")
            elif path == "/status/500":
                self._send(500, b"boom", "text/plain")
            elif path == "/html":
                self._send(200, b"<html><body>not an image</body></html>", "text/html")
            elif path == "/slow":
                self.send_response(200)
                self.end_headers()
                for _ in range(100):
                    self.wfile.write(b"\xff")
                    self.wfile.flush()
                    time.sleep(0.1)
            elif path == "/endless":
                self.send_response(200)
                self.end_headers()
                chunk = b"\x00" * 65536
                for _ in range(2000):  # 128 MB at most, then stop on our own
                    self.wfile.write(chunk)
            elif path == "/redirect-loop":
                self.send_response(302)
                self.send_header("Location", "/redirect-loop")
                self.end_headers()
            else:
                self._send(404, b"no such path", "text/plain")

    return Handler


@contextmanager
def image_server(images: dict[str, bytes]) -> Iterator[str]:
    """Serve on 127.0.0.1 (only); yields the base URL."""
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), make_handler(images))
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()

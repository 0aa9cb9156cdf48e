"""Fetching image bytes: file roots, symlinks, and http(s) against a loopback server."""

from __future__ import annotations

import http.server
import ipaddress
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from shared.errors import (
    FetchError,
    ForbiddenSourceError,
    SourceError,
    SourceNotFoundError,
    SourceTooLargeError,
)
from shared.fetch import ImageFetcher, resolve_file_uri

LOOPBACK = [ipaddress.ip_network("127.0.0.1/32")]


@pytest.fixture
def roots(tmp_path: Path) -> tuple[Path, Path]:
    inside = tmp_path / "photos"
    outside = tmp_path / "secret"
    inside.mkdir()
    outside.mkdir()
    (inside / "a.jpg").write_bytes(b"A" * 10)
    (outside / "s.jpg").write_bytes(b"S" * 10)
    return inside, outside


def test_file_inside_root_is_read(roots: tuple[Path, Path]) -> None:
    inside, _ = roots
    with ImageFetcher(file_roots=[inside]) as fetcher:
        assert fetcher.fetch((inside / "a.jpg").as_uri()) == b"A" * 10


@pytest.mark.parametrize(
    "uri_for",
    [
        lambda i, o: (o / "s.jpg").as_uri(),                       # plainly outside
        lambda i, o: f"file://{i}/../secret/s.jpg",                 # dot-dot escape
        lambda i, o: f"file://{i}/%2e%2e/secret/s.jpg",             # encoded dot-dot
        lambda i, o: "file://../../etc/passwd",                     # relative in disguise
        lambda i, o: "file://otherhost/etc/passwd",                 # remote file URI
        lambda i, o: f"file://{i}/link-out.jpg",                    # symlink out of the root
        lambda i, o: f"file://{i}/dirlink/s.jpg",                   # symlinked directory
    ],
)
def test_escapes_are_refused(roots: tuple[Path, Path], uri_for) -> None:  # type: ignore[no-untyped-def]
    inside, outside = roots
    os.symlink(outside / "s.jpg", inside / "link-out.jpg")
    os.symlink(outside, inside / "dirlink")
    with pytest.raises(ForbiddenSourceError):
        resolve_file_uri(uri_for(inside, outside), [inside.resolve()])


def test_symlink_inside_root_is_followed(roots: tuple[Path, Path]) -> None:
    inside, _ = roots
    os.symlink(inside / "a.jpg", inside / "alias.jpg")
    with ImageFetcher(file_roots=[inside]) as fetcher:
        assert fetcher.fetch((inside / "alias.jpg").as_uri()) == b"A" * 10


def test_no_roots_means_no_files(roots: tuple[Path, Path]) -> None:
    with ImageFetcher() as fetcher, pytest.raises(ForbiddenSourceError, match="IMAGE_FILE_ROOTS"):
        fetcher.fetch((roots[0] / "a.jpg").as_uri())


def test_missing_and_oversized_files(roots: tuple[Path, Path]) -> None:
    inside, _ = roots
    with ImageFetcher(file_roots=[inside], max_bytes=1024) as fetcher:
        _check_missing_and_oversized(fetcher, inside)


def _check_missing_and_oversized(fetcher: ImageFetcher, inside: Path) -> None:
    with pytest.raises(SourceNotFoundError):
        fetcher.fetch((inside / "nope.jpg").as_uri())
    (inside / "big.jpg").write_bytes(b"x" * 2048)
    with pytest.raises(SourceTooLargeError):
        fetcher.fetch((inside / "big.jpg").as_uri())


def test_unknown_scheme_is_refused() -> None:
    with ImageFetcher() as fetcher, pytest.raises(ForbiddenSourceError):
        fetcher.fetch("ftp://127.0.0.1/a.jpg")


class _Handler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args: object) -> None:
        pass

    def do_GET(self) -> None:  # noqa: N802
        try:
            self._respond()
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up, as the limits tell it to

    def _respond(self) -> None:
        port = self.server.server_address[1]
        if self.path == "/ok.jpg":
            body = b"IMG" * 100
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        elif self.path == "/big.jpg":
            self.send_response(200)
            self.end_headers()  # no Content-Length: the limit must hold while reading
            for _ in range(100):
                self.wfile.write(b"x" * 1024)
        elif self.path == "/slow.jpg":
            self.send_response(200)
            self.end_headers()
            for _ in range(40):
                self.wfile.write(b"x")
                self.wfile.flush()
                time.sleep(0.1)
        elif self.path == "/redirect-ok":
            self.send_response(302)
            self.send_header("Location", "/ok.jpg")
            self.end_headers()
        elif self.path == "/redirect-inward":
            self.send_response(302)
            self.send_header("Location", f"http://127.0.0.2:{port}/ok.jpg")
            self.end_headers()
        elif self.path == "/500":
            self.send_error(500)
        elif self.path == "/403":
            self.send_error(403)
        else:
            self.send_error(404)


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def test_http_fetch_through_the_allow_list(server: str) -> None:
    with ImageFetcher(allowed_networks=LOOPBACK, timeout_s=5) as fetcher:
        assert fetcher.fetch(f"{server}/ok.jpg") == b"IMG" * 100
        assert fetcher.fetch(f"{server}/redirect-ok") == b"IMG" * 100


def test_loopback_is_refused_by_default(server: str) -> None:
    with ImageFetcher() as fetcher, pytest.raises(ForbiddenSourceError):
        fetcher.fetch(f"{server}/ok.jpg")


def test_redirect_to_a_refused_address_is_not_followed(server: str) -> None:
    with ImageFetcher(allowed_networks=LOOPBACK) as fetcher, pytest.raises(ForbiddenSourceError):
        fetcher.fetch(f"{server}/redirect-inward")


@pytest.mark.parametrize(
    ("path", "error", "reason", "retriable"),
    [
        ("/missing.jpg", SourceNotFoundError, "fetch_http_4xx", False),
        ("/403", SourceError, "fetch_http_4xx", False),
        ("/500", FetchError, "fetch_http_5xx", True),
        ("/big.jpg", SourceTooLargeError, "too_large", False),
        ("/slow.jpg", FetchError, "fetch_timeout", True),
    ],
)
def test_http_failures_are_classified(server: str, path: str, error: type, reason: str,
                                      retriable: bool) -> None:
    started = time.monotonic()
    with ImageFetcher(allowed_networks=LOOPBACK, max_bytes=50_000, timeout_s=1.0) as fetcher:
        with pytest.raises(error) as info:
            fetcher.fetch(f"{server}{path}")
    assert (info.value.reason, info.value.retriable) == (reason, retriable)
    assert time.monotonic() - started < 3.0  # the total deadline holds for a trickle


def test_a_root_reached_through_a_symlink_accepts_both_spellings(tmp_path: Path) -> None:
    real = tmp_path / "mnt-data"
    real.mkdir()
    (real / "p.jpg").write_bytes(b"P")
    alias = tmp_path / "data"
    os.symlink(real, alias)
    with ImageFetcher(file_roots=[alias]) as fetcher:
        assert fetcher.fetch((alias / "p.jpg").as_uri()) == b"P"
        assert fetcher.fetch((real / "p.jpg").as_uri()) == b"P"

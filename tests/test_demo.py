"""`imgsearch demo`'s download and extraction, against zips built here and a loopback server.

Network safety: nothing here reaches the real dataset addresses; every request goes to
a tiny HTTP server on 127.0.0.1.
"""

from __future__ import annotations

import hashlib
import http.server
import io
import stat
import threading
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import ClassVar

import pytest
from PIL import Image

from imgsearch.demo import (
    COMPLETE_MARKER,
    OFFLINE_HINT,
    check_download_url,
    download,
    fetch_dataset,
    safe_extract,
)
from shared.errors import FetchError, SourceError
from tests.conftest import free_port


def jpeg(color: tuple[int, int, int]) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (32, 32), color).save(out, "JPEG")
    return out.getvalue()


def dataset_zip() -> bytes:
    """A miniature of the demo archive's layout: train/<class>/, test/<class>/, the csv."""
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as zf:
        zf.writestr("reverse_image_search.csv", "id,path,label\n0,./train/cat/a.JPEG,cat\n")
        zf.writestr("train/cat/a.JPEG", jpeg((200, 10, 10)))
        zf.writestr("train/dog/b.JPEG", jpeg((10, 200, 10)))
        zf.writestr("test/cat/q.JPEG", jpeg((190, 20, 20)))
    return out.getvalue()


def zip_with(*members: tuple[zipfile.ZipInfo | str, bytes]) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as zf:
        for info, data in members:
            zf.writestr(info, data)
    return out.getvalue()


def write(tmp_path: Path, data: bytes) -> Path:
    path = tmp_path / "archive.zip"
    path.write_bytes(data)
    return path


# -- safe extraction ------------------------------------------------------------------------------


def test_safe_extract_writes_the_members(tmp_path: Path) -> None:
    target = tmp_path / "out"
    files = safe_extract(write(tmp_path, dataset_zip()), target)
    assert sorted(p.relative_to(target).as_posix() for p in files) == [
        "reverse_image_search.csv", "test/cat/q.JPEG", "train/cat/a.JPEG", "train/dog/b.JPEG"]
    with Image.open(target / "train/dog/b.JPEG") as image:
        assert image.size == (32, 32)


@pytest.mark.parametrize("name", ["../evil.txt", "good/../../evil.txt", "/tmp/evil.txt",
                                  "..\\evil.txt", "C:/evil.txt"])
def test_safe_extract_refuses_paths_outside_the_target(tmp_path: Path, name: str) -> None:
    # A harmless member first: a refused archive must leave nothing behind.
    archive = write(tmp_path, zip_with(("ok/first.txt", b"fine"), (name, b"escaped")))
    target = tmp_path / "deep" / "out"
    with pytest.raises(SourceError) as err:
        safe_extract(archive, target)
    assert err.value.reason == "unsafe_archive"
    assert not target.exists()
    assert not (tmp_path / "deep" / "evil.txt").exists()
    assert not (tmp_path / "evil.txt").exists()


def test_safe_extract_refuses_symlinks(tmp_path: Path) -> None:
    link = zipfile.ZipInfo("photos/passwd")
    link.external_attr = (stat.S_IFLNK | 0o777) << 16
    archive = write(tmp_path, zip_with((link, b"/etc/passwd")))
    with pytest.raises(SourceError, match="symbolic link"):
        safe_extract(archive, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_safe_extract_refuses_archives_that_expand_too_far(tmp_path: Path) -> None:
    archive = write(tmp_path, zip_with(("zeros.bin", bytes(1_000_000))))
    with pytest.raises(SourceError, match="would expand"):
        safe_extract(archive, tmp_path / "out", max_bytes=100_000)


def test_safe_extract_refuses_a_file_that_is_not_a_zip(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="not a zip"):
        safe_extract(write(tmp_path, b"<html>rate limited</html>"), tmp_path / "out")


def test_download_url_rule() -> None:
    check_download_url("https://example.org/data.zip")
    check_download_url("http://127.0.0.1:8080/data.zip")
    check_download_url("http://[::1]:8080/data.zip")
    for url in ("http://192.0.2.1/data.zip", "ftp://127.0.0.1/data.zip", "file:///etc/passwd"):
        with pytest.raises(SourceError):
            check_download_url(url)


# -- download over loopback ---------------------------------------------------------------------


class _Handler(http.server.BaseHTTPRequestHandler):
    routes: ClassVar[dict[str, tuple[int, bytes, dict[str, str]]]] = {}

    def do_GET(self) -> None:  # the stdlib's name
        status, body, headers = self.routes.get(self.path, (404, b"not found", {}))
        self.send_response(status)
        headers = {"Content-Length": str(len(body)), **headers}
        for key, value in headers.items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def server() -> Iterator[tuple[str, dict[str, tuple[int, bytes, dict[str, str]]]]]:
    routes: ClassVar[dict[str, tuple[int, bytes, dict[str, str]]]] = {}
    handler = type("Handler", (_Handler,), {"routes": routes})
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}", routes
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join()


def test_download_verifies_size_and_checksum(tmp_path: Path, server: tuple) -> None:
    base, routes = server
    body = dataset_zip()
    routes["/data.zip"] = (200, body, {})
    digest = hashlib.sha256(body).hexdigest()
    seen: list[tuple[int, int | None]] = []

    dest = tmp_path / "data.zip"
    assert download(f"{base}/data.zip", dest, sha256=digest, expected_size=len(body),
                    progress=lambda done, total: seen.append((done, total))) == digest
    assert dest.read_bytes() == body
    assert seen[-1] == (len(body), len(body))

    wrong = tmp_path / "wrong.zip"
    with pytest.raises(SourceError, match="does not match") as err:
        download(f"{base}/data.zip", wrong, sha256="0" * 64)
    assert err.value.reason == "archive_invalid"
    with pytest.raises(SourceError, match="expected"):
        download(f"{base}/data.zip", wrong, expected_size=len(body) + 1)
    with pytest.raises(SourceError) as too_big:
        download(f"{base}/data.zip", wrong, max_bytes=len(body) - 1)
    assert too_big.value.reason == "too_large"
    with pytest.raises(SourceError, match="HTTP 404"):
        download(f"{base}/missing.zip", wrong)
    # Nothing half-downloaded is left where a later run would trust it.
    assert not wrong.exists()
    assert not list(tmp_path.glob("*.part"))


def test_fetch_dataset_downloads_once_and_falls_back_to_the_second_address(
        tmp_path: Path, server: tuple) -> None:
    base, routes = server
    body = dataset_zip()
    routes["/mirror.zip"] = (200, body, {})
    target = tmp_path / "demo"

    root = fetch_dataset(target, [f"{base}/gone.zip", f"{base}/mirror.zip"],
                         sha256=hashlib.sha256(body).hexdigest(), expected_size=len(body))
    assert root == target
    assert (root / "train" / "cat" / "a.JPEG").is_file()
    assert (root / COMPLETE_MARKER).is_file()

    routes.clear()  # the second run must not need the network
    assert fetch_dataset(target, [f"{base}/mirror.zip"]) == target


def test_fetch_dataset_offline_names_the_alternative(tmp_path: Path) -> None:
    closed = free_port()  # nothing listens there: what an offline machine sees
    with pytest.raises(FetchError) as err:
        fetch_dataset(tmp_path / "demo", [f"http://127.0.0.1:{closed}/data.zip"])
    assert OFFLINE_HINT in str(err.value)
    assert "imgsearch up /path/to/photos" in str(err.value)
    assert not (tmp_path / "demo").exists()


def test_fetch_dataset_never_overwrites_a_users_folder(tmp_path: Path, server: tuple) -> None:
    base, routes = server
    routes["/data.zip"] = (200, dataset_zip(), {})
    target = tmp_path / "photos"
    target.mkdir()
    (target / "mine.jpg").write_bytes(b"precious")
    with pytest.raises(SourceError, match="not a finished demo download"):
        fetch_dataset(target, [f"{base}/data.zip"])
    assert (target / "mine.jpg").read_bytes() == b"precious"

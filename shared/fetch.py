"""Get an image's bytes from where an event says they are.

* ``file://``   only inside IMAGE_FILE_ROOTS, after resolving symlinks and ``..``;
* ``http(s)://`` with timeouts, a total deadline, a byte limit and the SSRF guard,
                 connecting to the address that was checked (no DNS rebinding);
* ``s3://``      through boto3, when the ``s3`` extra is installed.
"""

from __future__ import annotations

import os
import time
import urllib.parse
from collections.abc import Sequence
from pathlib import Path

import httpx

from shared.config import Settings
from shared.errors import (
    FetchError,
    ForbiddenSourceError,
    SourceError,
    SourceNotFoundError,
    SourceTooLargeError,
)
from shared.netguard import IPNetwork, resolve_allowed

USER_AGENT = "imgsearch-fetcher/0.1"


def resolve_file_uri(uri: str, roots: Sequence[Path]) -> Path:
    """Map a ``file://`` URI to a real path inside one of ``roots``, or refuse it."""
    parsed = urllib.parse.urlsplit(uri)
    if parsed.scheme != "file":
        raise ForbiddenSourceError(f"not a file:// URI: {uri!r}")
    if parsed.netloc not in ("", "localhost"):
        # file://../../etc/passwd parses with netloc "..": a relative path in disguise.
        raise ForbiddenSourceError(
            f"file URI {uri!r} must be absolute (file:///path), not relative or remote"
        )
    if parsed.query or parsed.fragment:
        raise ForbiddenSourceError(f"file URI {uri!r} must not have a query or fragment")
    raw_path = urllib.parse.unquote(parsed.path)
    if "\x00" in raw_path or not raw_path.startswith("/"):
        raise ForbiddenSourceError(f"file URI {uri!r} does not name an absolute path")
    if not roots:
        raise ForbiddenSourceError(
            "file:// URIs are disabled: set IMAGE_FILE_ROOTS to the directories to read from"
        )
    # Check the path as written first, so nothing outside the roots is even looked at
    # (a "not found" there would tell a caller which files exist).
    lexical = Path(os.path.normpath(raw_path))
    spellings = {Path(os.path.normpath(r)) for r in roots} | {Path(r).resolve() for r in roots}
    if not any(lexical.is_relative_to(root) for root in spellings):
        raise ForbiddenSourceError(
            f"{raw_path} is outside IMAGE_FILE_ROOTS ({', '.join(str(r) for r in roots)})"
        )
    try:
        real = Path(raw_path).resolve(strict=True)
    except FileNotFoundError as exc:
        raise SourceNotFoundError(f"no such file: {raw_path}") from exc
    except (OSError, RuntimeError) as exc:  # symlink loops, permission on a parent
        raise SourceNotFoundError(f"cannot resolve {raw_path}: {exc}") from exc
    if not any(real.is_relative_to(Path(root).resolve()) for root in roots):
        raise ForbiddenSourceError(
            f"{raw_path} resolves to {real}, outside IMAGE_FILE_ROOTS "
            f"({', '.join(str(r) for r in roots)})"
        )
    if not real.is_file():
        raise SourceNotFoundError(f"{real} is not a regular file")
    return real


def read_limited_file(path: Path, max_bytes: int) -> bytes:
    try:
        with path.open("rb") as handle:
            data = handle.read(max_bytes + 1)
    except OSError as exc:
        raise SourceNotFoundError(f"cannot read {path}: {exc}") from exc
    if len(data) > max_bytes:
        raise SourceTooLargeError(f"{path} is larger than FETCH_MAX_BYTES={max_bytes}")
    return data


class ImageFetcher:
    """Fetches bytes for a URI. Thread-safe: one instance serves a pool of threads."""

    def __init__(
        self,
        *,
        file_roots: Sequence[Path] = (),
        timeout_s: float = 10.0,
        max_bytes: int = 25 * 1024 * 1024,
        max_redirects: int = 5,
        allowed_networks: Sequence[IPNetwork] = (),
    ) -> None:
        self.file_roots = [Path(os.path.abspath(r)) for r in file_roots]
        self.timeout_s = timeout_s
        self.max_bytes = max_bytes
        self.max_redirects = max_redirects
        self.allowed_networks = list(allowed_networks)
        self._http = httpx.Client(
            timeout=httpx.Timeout(timeout_s),
            follow_redirects=False,  # each hop is checked by the SSRF guard
            headers={"User-Agent": USER_AGENT, "Accept": "image/*"},
            trust_env=False,
        )
        self._s3 = None

    @classmethod
    def from_settings(cls, settings: Settings) -> ImageFetcher:
        return cls(
            file_roots=settings.image_file_roots,
            timeout_s=settings.fetch_timeout_s,
            max_bytes=settings.fetch_max_bytes,
            max_redirects=settings.fetch_max_redirects,
            allowed_networks=settings.fetch_allowed_networks,
        )

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> ImageFetcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def fetch(self, uri: str) -> bytes:
        try:
            # Parsing is where a malformed URI shows (an unclosed "[", a port past 65535).
            parts = urllib.parse.urlsplit(uri)
            scheme = parts.scheme.lower()
            if scheme in ("http", "https"):
                parts.port  # noqa: B018 - raises ValueError for a bad port
        except ValueError as exc:
            raise ForbiddenSourceError(f"not a valid URI: {uri[:200]!r}: {exc}",
                                       reason="unsupported_uri") from exc
        if scheme == "file":
            return read_limited_file(resolve_file_uri(uri, self.file_roots), self.max_bytes)
        if scheme in ("http", "https"):
            return self._fetch_http(uri)
        if scheme == "s3":
            return self._fetch_s3(uri)
        raise ForbiddenSourceError(
            f"unsupported URI scheme {scheme!r} in {uri[:200]!r}; use file://, http(s):// or s3://",
            reason="unsupported_uri",
        )

    # -- http(s) -------------------------------------------------------------------------

    def _fetch_http(self, uri: str) -> bytes:
        deadline = time.monotonic() + self.timeout_s
        url = uri
        for _hop in range(self.max_redirects + 1):
            response_or_next = self._http_once(url, deadline)
            if isinstance(response_or_next, bytes):
                return response_or_next
            url = response_or_next
        raise SourceError(
            f"too many redirects (more than {self.max_redirects}) from {uri}",
            reason="too_many_redirects",
        )

    def _http_once(self, url: str, deadline: float) -> bytes | str:
        """One request. Returns the body, or the next URL for a redirect."""
        try:
            parts = urllib.parse.urlsplit(url)
            port = parts.port or (443 if parts.scheme == "https" else 80)
        except ValueError as exc:  # a redirect to a malformed URL
            raise ForbiddenSourceError(f"not a valid URL: {url[:200]!r}: {exc}") from exc
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ForbiddenSourceError(f"refusing to follow to {url[:200]!r}")
        ip = resolve_allowed(parts.hostname, port, self.allowed_networks)
        # Connect to the checked address; keep the name for Host and TLS (SNI, certificate).
        ip_host = f"[{ip}]" if ip.version == 6 else str(ip)
        pinned = urllib.parse.urlunsplit(
            (parts.scheme, f"{ip_host}:{port}", parts.path or "/", parts.query, "")
        )
        host_header = parts.hostname if parts.port is None else f"{parts.hostname}:{parts.port}"
        request = self._http.build_request(
            "GET",
            pinned,
            headers={"Host": host_header},
            extensions={"sni_hostname": parts.hostname},
        )
        try:
            response = self._http.send(request, stream=True)
        except httpx.TimeoutException as exc:
            raise FetchError(f"timed out fetching {url}: {exc}", reason="fetch_timeout") from exc
        except httpx.HTTPError as exc:
            raise FetchError(f"could not fetch {url}: {exc}", reason="fetch_connection") from exc
        try:
            if response.is_redirect:
                location = response.headers.get("location")
                if not location:
                    raise SourceError(f"redirect without Location from {url}")
                return urllib.parse.urljoin(url, location)
            status = response.status_code
            if status == 404 or status == 410:
                raise SourceNotFoundError(f"HTTP {status} from {url}", reason="fetch_http_4xx")
            if status == 429 or status >= 500:
                raise FetchError(f"HTTP {status} from {url}", reason="fetch_http_5xx")
            if status >= 400:
                raise SourceError(f"HTTP {status} from {url}", reason="fetch_http_4xx")
            if status != 200:
                raise SourceError(f"unexpected HTTP {status} from {url}", reason="fetch_http_4xx")
            declared = response.headers.get("content-length")
            if declared and declared.isdigit() and int(declared) > self.max_bytes:
                raise SourceTooLargeError(
                    f"{url} declares {declared} bytes; FETCH_MAX_BYTES is {self.max_bytes}"
                )
            chunks: list[bytes] = []
            size = 0
            try:
                for chunk in response.iter_bytes():
                    size += len(chunk)
                    if size > self.max_bytes:
                        raise SourceTooLargeError(
                            f"{url} sent more than FETCH_MAX_BYTES={self.max_bytes} bytes"
                        )
                    if time.monotonic() > deadline:
                        # A server that trickles bytes never trips the per-read timeout.
                        raise FetchError(
                            f"fetching {url} took longer than FETCH_TIMEOUT_S={self.timeout_s}",
                            reason="fetch_timeout",
                        )
                    chunks.append(chunk)
            except httpx.TimeoutException as exc:
                raise FetchError(f"timed out reading {url}", reason="fetch_timeout") from exc
            except httpx.HTTPError as exc:
                raise FetchError(f"error reading {url}: {exc}", reason="fetch_connection") from exc
            return b"".join(chunks)
        finally:
            response.close()

    # -- s3 --------------------------------------------------------------------------------

    def _fetch_s3(self, uri: str) -> bytes:
        parts = urllib.parse.urlsplit(uri)
        bucket, key = parts.netloc, parts.path.lstrip("/")
        if not bucket or not key:
            raise SourceError(f"s3 URI must be s3://bucket/key, got {uri!r}", reason="unsupported_uri")
        if self._s3 is None:
            try:
                import boto3  # optional extra
            except ImportError as exc:
                raise SourceError(
                    "s3:// URIs need the s3 extra: pip install 'imgsearch[s3]'",
                    reason="unsupported_uri",
                ) from exc
            self._s3 = boto3.client("s3")
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            obj = self._s3.get_object(Bucket=bucket, Key=key)
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "")
            if code in ("NoSuchKey", "NoSuchBucket", "404"):
                raise SourceNotFoundError(f"{uri}: {code}") from exc
            if code in ("AccessDenied", "403"):
                raise SourceError(f"{uri}: access denied", reason="fetch_http_4xx") from exc
            raise FetchError(f"{uri}: {exc}") from exc
        except BotoCoreError as exc:
            raise FetchError(f"{uri}: {exc}") from exc
        if obj.get("ContentLength", 0) > self.max_bytes:
            raise SourceTooLargeError(f"{uri} is larger than FETCH_MAX_BYTES={self.max_bytes}")
        data: bytes = obj["Body"].read(self.max_bytes + 1)
        if len(data) > self.max_bytes:
            raise SourceTooLargeError(f"{uri} is larger than FETCH_MAX_BYTES={self.max_bytes}")
        return data

"""``imgsearch demo``: fetch the seed tutorials' sample photos and run ``imgsearch up`` on them.

The set is the Towhee/Milvus reverse-image-search subset of ImageNet: 100 classes,
10 gallery photos each under ``train/``, one query per class under ``test/``, and
``reverse_image_search.csv``. The archive is downloaded once, checked (its declared
size, a size bound, a checksum once one is recorded below, the zip's own CRCs) and
extracted without letting any member escape the target folder.
"""

from __future__ import annotations

import hashlib
import ipaddress
import shutil
import stat
import sys
import tempfile
import urllib.parse
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path, PurePosixPath
from typing import Any

import click
import httpx

from imgsearch.up import UP_EPILOG, UpOptions, run_up, up_options
from shared.errors import FetchError, SourceError

DEMO_URLS = (
    "https://github.com/towhee-io/examples/releases/download/data/reverse_image_search.zip",
    ("https://github.com/milvus-io/pymilvus-assets/releases/download/imagedata/"
     "reverse_image_search.zip"),
)
# Record these from a verified download (the command prints both); None skips the check.
DEMO_ARCHIVE_SHA256: str | None = None
DEMO_ARCHIVE_SIZE: int | None = None
MAX_ARCHIVE_BYTES = 512 * 1024 * 1024
MAX_EXTRACTED_BYTES = 2 * 1024 * 1024 * 1024
MAX_MEMBERS = 20_000
COMPLETE_MARKER = ".imgsearch-demo-complete"
OFFLINE_HINT = "Index your own photos instead: imgsearch up /path/to/photos"


# -- download -----------------------------------------------------------------------------------


def check_download_url(url: str) -> None:
    """https anywhere; plain http only to this machine (a local mirror, or a test)."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme == "https" and parts.hostname:
        return
    if parts.scheme == "http" and parts.hostname:
        host = parts.hostname
        if host == "localhost":
            return
        try:
            if ipaddress.ip_address(host).is_loopback:
                return
        except ValueError:
            pass
    raise SourceError(f"refusing to download from {url!r}: only https:// (or http:// to "
                      "localhost) is allowed", reason="unsupported_uri")


def download(
    url: str,
    dest: Path,
    *,
    expected_size: int | None = None,
    sha256: str | None = None,
    max_bytes: int = MAX_ARCHIVE_BYTES,
    timeout_s: float = 30.0,
    progress: Callable[[int, int | None], None] | None = None,
) -> str:
    """Stream ``url`` to ``dest`` and verify it; returns the file's sha256 (hex).

    ``dest`` appears only once every check has passed. ``progress(bytes_so_far, total)``
    is called as data arrives. Raises FetchError when the server cannot be reached
    (retriable) and SourceError when the archive is not the one expected.
    """
    check_download_url(url)

    def check_redirect(request: httpx.Request) -> None:
        check_download_url(str(request.url))  # a redirect must not downgrade to http

    part = dest.with_name(dest.name + ".part")
    digest = hashlib.sha256()
    received = 0
    try:
        with (
            httpx.Client(timeout=httpx.Timeout(timeout_s), follow_redirects=True,
                         event_hooks={"request": [check_redirect]}) as client,
            client.stream("GET", url) as response,
        ):
            if response.status_code != 200:
                status = response.status_code
                raise SourceError(f"HTTP {status} from {url}", reason="fetch_http_4xx",
                                  retriable=status >= 500)
            declared = response.headers.get("content-length")
            total = int(declared) if declared and declared.isdigit() else None
            for limit, what in ((total, "declares"), (expected_size, "is expected to be")):
                if limit is not None and limit > max_bytes:
                    raise SourceError(f"{url} {what} {limit} bytes, over the "
                                      f"{max_bytes}-byte limit", reason="too_large")
            with part.open("wb") as out:
                for chunk in response.iter_bytes(1 << 16):
                    received += len(chunk)
                    if received > max_bytes:
                        raise SourceError(f"{url} sent more than {max_bytes} bytes",
                                          reason="too_large")
                    digest.update(chunk)
                    out.write(chunk)
                    if progress:
                        progress(received, total)
    except httpx.HTTPError as exc:
        part.unlink(missing_ok=True)
        raise FetchError(f"cannot download {url}: {type(exc).__name__}: {exc}",
                         reason="fetch_connection") from exc
    except BaseException:
        part.unlink(missing_ok=True)
        raise
    try:
        if total is not None and received != total:
            raise SourceError(f"{url}: got {received} bytes, the server declared {total} "
                              "(truncated download)", reason="archive_invalid")
        if expected_size is not None and received != expected_size:
            raise SourceError(f"{url}: got {received} bytes, expected {expected_size}",
                              reason="archive_invalid")
        actual = digest.hexdigest()
        if sha256 is not None and actual != sha256.lower():
            raise SourceError(f"{url}: sha256 {actual} does not match the recorded {sha256}",
                              reason="archive_invalid")
    except BaseException:
        part.unlink(missing_ok=True)
        raise
    part.replace(dest)
    return actual


# -- safe extraction ------------------------------------------------------------------------------


def _member_path(info: zipfile.ZipInfo) -> PurePosixPath:
    """The member's relative path, or SourceError if it could land outside the target."""
    name = info.filename.replace("\\", "/")
    path = PurePosixPath(name)
    if (
        not name
        or name.startswith("/")
        or (len(name) > 1 and name[1] == ":")  # C:/... on Windows
        or "\x00" in name
        or any(part == ".." for part in path.parts)
    ):
        raise SourceError(f"unsafe path in archive: {info.filename!r}", reason="unsafe_archive")
    mode = info.external_attr >> 16
    if stat.S_ISLNK(mode):
        raise SourceError(f"archive member {info.filename!r} is a symbolic link",
                          reason="unsafe_archive")
    # Zips written on Windows, or by writestr, carry no file type: those are plain files.
    if stat.S_IFMT(mode) and not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
        raise SourceError(f"archive member {info.filename!r} is not a file or folder",
                          reason="unsafe_archive")
    return path


def safe_extract(archive: Path, target: Path, *,
                 max_bytes: int = MAX_EXTRACTED_BYTES) -> list[Path]:
    """Extract ``archive`` into ``target``; refuse the whole archive (writing nothing)
    if any member is absolute, climbs out with ``..``, is a link or device, or if it
    would expand beyond ``max_bytes``. Returns the extracted files."""
    target = target.resolve()
    try:
        zf = zipfile.ZipFile(archive)
    except zipfile.BadZipFile as exc:
        raise SourceError(f"{archive} is not a zip archive: {exc}",
                          reason="archive_invalid") from exc
    with zf:
        infos = zf.infolist()
        if len(infos) > MAX_MEMBERS:
            raise SourceError(f"{archive} has {len(infos)} members; at most {MAX_MEMBERS}",
                              reason="unsafe_archive")
        planned = [(info, _member_path(info)) for info in infos]
        total = sum(info.file_size for info in infos)
        if total > max_bytes:
            raise SourceError(f"{archive} would expand to {total} bytes; limit {max_bytes}",
                              reason="unsafe_archive")
        for _, rel in planned:
            dest = (target / rel).resolve()
            if not dest.is_relative_to(target):
                raise SourceError(f"archive member {rel} resolves outside {target}",
                                  reason="unsafe_archive")
        written: list[Path] = []
        for info, rel in planned:
            dest = target / rel
            if info.is_dir():
                dest.mkdir(parents=True, exist_ok=True)
                continue
            dest.parent.mkdir(parents=True, exist_ok=True)
            try:
                with zf.open(info) as src, dest.open("wb") as out:
                    shutil.copyfileobj(src, out, 1 << 20)  # checks the member's CRC at the end
            except zipfile.BadZipFile as exc:
                raise SourceError(f"{archive}: member {rel} is corrupt: {exc}",
                                  reason="archive_invalid") from exc
            written.append(dest)
        return written


# -- the dataset ---------------------------------------------------------------------------------


def dataset_root(extracted: Path) -> Path:
    """The folder holding train/ (the zip may or may not wrap it in a top folder)."""
    if (extracted / "train").is_dir():
        return extracted
    for child in sorted(extracted.iterdir()):
        if (child / "train").is_dir():
            return child
    raise SourceError(f"the demo archive has no train/ folder under {extracted}",
                      reason="archive_invalid")


def fetch_dataset(target: Path, urls: Sequence[str] = DEMO_URLS, *,
                  sha256: str | None = DEMO_ARCHIVE_SHA256,
                  expected_size: int | None = DEMO_ARCHIVE_SIZE) -> Path:
    """Download and extract the demo set into ``target`` once; returns its root folder."""
    from tqdm import tqdm

    if (target / COMPLETE_MARKER).exists():
        return dataset_root(target)
    if target.exists() and any(target.iterdir()):
        raise SourceError(f"{target} exists and is not a finished demo download; remove it "
                          "or choose another --dataset-dir", reason="target_exists")
    target.parent.mkdir(parents=True, exist_ok=True)
    errors: list[str] = []
    with tempfile.TemporaryDirectory(prefix=".imgsearch-demo-", dir=target.parent) as tmp:
        archive = Path(tmp) / "reverse_image_search.zip"
        for url in urls:
            bar = tqdm(unit="B", unit_scale=True, desc="downloading", file=sys.stderr)

            def show(done: int, total: int | None, bar: Any = bar) -> None:
                if total and bar.total != total:
                    bar.total = total
                bar.update(done - bar.n)

            try:
                digest = download(url, archive, sha256=sha256, expected_size=expected_size,
                                  progress=show)
            except (FetchError, SourceError) as exc:
                errors.append(str(exc))
                continue
            finally:
                bar.close()
            click.echo(f"downloaded {url}: {archive.stat().st_size} bytes, sha256 {digest}",
                       err=True)
            break
        else:
            raise FetchError(
                "cannot download the demo dataset (no internet?):\n  "
                + "\n  ".join(errors) + f"\n{OFFLINE_HINT}",
                reason="fetch_connection",
            )
        staging = Path(tmp) / "extracted"
        files = safe_extract(archive, staging)
        click.echo(f"extracted {len(files)} files", err=True)
        dataset_root(staging)  # fail before moving anything into place
        (staging / COMPLETE_MARKER).write_text(digest + "\n")
        if target.exists():
            target.rmdir()  # empty (checked above); never delete anything of the user's
        staging.replace(target)
    return dataset_root(target)


@click.command("demo", epilog=UP_EPILOG)
@click.option("--dataset-dir", type=click.Path(file_okay=False, path_type=Path),
              default=Path("reverse_image_search"), show_default=True,
              help="Where the sample photos are downloaded and kept.")
@up_options
def demo(dataset_dir: Path, **options: Any) -> None:
    """Download the sample photos (1,000 ImageNet photos in 100 classes, 100 queries) and
    run `imgsearch up` on them. Needs internet once; offline, index your own photos with
    `imgsearch up /path/to/photos`."""
    try:
        root = fetch_dataset(dataset_dir)
    except (FetchError, SourceError) as exc:
        raise click.ClickException(str(exc)) from exc
    gallery = root / "train"
    click.echo(f"demo:    gallery {gallery}; try a query photo from {root / 'test'} "
               "on the search page")
    sys.exit(run_up(UpOptions(paths=(gallery,), **options)))

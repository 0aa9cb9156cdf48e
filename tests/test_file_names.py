"""Files are named by strangers: whatever the names under a folder, collecting it (the
start of `imgsearch index`, `publish` and `up`) never raises, keeps every file whose path
can be an image id, and names every file it leaves out."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from imgsearch.publish import collect
from shared.metadata import InvalidValue, check_image_id

# Any character a Linux file name may hold (not "/" or NUL; no lone surrogates, which
# os.fsencode refuses), controls and line breaks included.
NAME_CHARS = st.characters(blacklist_characters="/\x00", blacklist_categories=("Cs",))
NAMES = st.text(NAME_CHARS, min_size=1, max_size=50).filter(
    lambda n: len((n + ".jpg").encode()) <= 255)


def valid(image_id: str) -> bool:
    try:
        check_image_id(image_id)
    except InvalidValue:
        return False
    return True


@settings(max_examples=60, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(names=st.lists(NAMES, min_size=1, max_size=6, unique=True),
       depth=st.integers(0, 45), prefix=st.sampled_from(["", "cam1/"]))
def test_any_file_names_are_collected_or_named_on_stderr(
        names: list[str], depth: int, prefix: str, capsys: pytest.CaptureFixture[str]) -> None:
    root = Path(tempfile.mkdtemp(prefix="names-"))
    try:
        folder = root / "photos"
        deep = folder.joinpath(*["nested-folder"] * depth)
        deep.mkdir(parents=True)
        written = []
        for name in names:
            path = deep / f"{name}.jpg"
            path.write_bytes(b"not decoded here")
            written.append(path.resolve())
        files = collect([folder], prefix)
        err = capsys.readouterr().err
        kept = {f.path for f in files}
        assert all(valid(f.image_id) for f in files)
        for path in written:
            image_id = f"{prefix}photos/{path.relative_to(folder.resolve()).as_posix()}"
            if valid(image_id):
                assert path in kept, image_id
            else:
                assert path not in kept and repr(str(path)) in err, image_id
    finally:
        shutil.rmtree(root)

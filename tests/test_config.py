"""Configuration: clear start-up errors, and a README table that lists every variable."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from shared.config import Settings, load_settings
from shared.errors import ConfigError

README = Path(__file__).resolve().parent.parent / "README.md"


def test_every_setting_is_documented_in_the_readme() -> None:
    text = README.read_text()
    documented = set(re.findall(r"`([A-Z][A-Z0-9_]+)`", text))
    missing = sorted(name.upper() for name in Settings.model_fields if name.upper() not in documented)
    assert missing == [], f"add these to the README's configuration table: {missing}"


@pytest.mark.parametrize(
    ("env", "names"),
    [
        ({"QDRANT_URL": "http://127.0.0.1:6333", "QDRANT_PATH": "/tmp/x"}, "QDRANT_URL"),
        ({"DEVICE": "tpu"}, "DEVICE"),
        ({"BATCH_SIZE": "0"}, "BATCH_SIZE"),
        ({"BATCH_SIZE": "many"}, "BATCH_SIZE"),
        ({"IMAGE_FILE_ROOTS": "/definitely/not/here"}, "IMAGE_FILE_ROOTS"),
        ({"FETCH_ALLOWED_NETWORKS": "not-a-network"}, "FETCH_ALLOWED_NETWORKS"),
        ({"KAFKA_ASSIGNMENT_STRATEGY": "sticky-ish"}, "KAFKA_ASSIGNMENT_STRATEGY"),
    ],
)
def test_misconfiguration_names_the_variable(monkeypatch: pytest.MonkeyPatch, env: dict[str, str],
                                             names: str) -> None:
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(ConfigError, match=names):
        load_settings()


def test_lists_accept_commas(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    monkeypatch.setenv("IMAGE_FILE_ROOTS", f"{tmp_path / 'a'},{tmp_path / 'b'}")
    monkeypatch.setenv("FETCH_ALLOWED_NETWORKS", "127.0.0.1/32, ::1/128")
    settings = load_settings()
    assert settings.image_file_roots == [tmp_path / "a", tmp_path / "b"]
    assert [str(n) for n in settings.fetch_allowed_networks] == ["127.0.0.1/32", "::1/128"]


def test_embedded_store_is_the_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("QDRANT_URL", raising=False)
    monkeypatch.delenv("QDRANT_PATH", raising=False)
    assert load_settings().embedded_store_path == Path("data").absolute()

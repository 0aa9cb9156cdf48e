"""`imgsearch dlq list` shows why events failed; `replay` brings them back once fixed."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from click.testing import CliRunner

from imgsearch.cli import cli
from imgsearch.files import find_images
from ingest_worker.service import WorkerGroup
from shared.components import Components
from shared.events import upload_event
from shared.kafka import ensure_topics
from tests.kafka_helpers import merge, publish, send_raw, settings_env, wait_committed


def run_workers(settings: Any, embedder: Any, ends: dict[int, int]) -> int:
    components = Components.load(settings, embedder=embedder)
    group = WorkerGroup(components, count=1)
    try:
        group.start()
        wait_committed(settings, ends, 120, alive=lambda: group.alive)
        return components.store.count()
    finally:
        group.close()
        components.close()


def test_list_then_replay_after_fixing_the_roots(make_settings: Any, embedder: Any, birds: Path,
                                                 tmp_path: Path) -> None:
    # Photos in a folder the workers are not yet allowed to read.
    incoming = tmp_path / "incoming"
    shutil.copytree(birds / "Blue_Jay", incoming)
    files = list(find_images([incoming]))[:12]
    settings = make_settings(image_file_roots=[birds])
    ensure_topics(settings, [settings.kafka_topic, settings.kafka_dlq_topic])
    events = [upload_event(f.image_id, uri=f.path.as_uri()) for f in files]
    ends = publish(settings, events)
    ends = merge(ends, send_raw(settings, [(b"junk", b"not json at all")]))
    assert run_workers(settings, embedder, ends) == 0

    env = settings_env(settings)
    runner = CliRunner()
    listed = runner.invoke(cli, ["dlq", "list", "--json"], env=env)
    assert listed.exit_code == 0, listed.output
    rows = [json.loads(line) for line in listed.stdout.splitlines()]
    assert sorted(r["reason"] for r in rows) == sorted(["forbidden_uri"] * 12 + ["invalid_json"])
    assert "13 dead letters" in listed.stderr and "forbidden_uri: 12" in listed.stderr

    dry = runner.invoke(cli, ["dlq", "replay", "--filter", "reason=forbidden_uri", "--dry-run"], env=env)
    assert dry.exit_code == 0 and "12 dead letters match" in dry.stderr

    # The operator fixes the cause (the folder becomes a root) and replays those only.
    fixed = make_settings(**{**settings.model_dump(include={"kafka_topic", "kafka_dlq_topic",
                                                           "kafka_group_id", "qdrant_path"}),
                             "image_file_roots": [birds, incoming]})
    replayed = runner.invoke(cli, ["dlq", "replay", "--filter", "reason=forbidden_uri", "--since", "1h"],
                             env=settings_env(fixed))
    assert replayed.exit_code == 0, replayed.output
    assert "replayed 12" in replayed.stderr
    # The replayed records follow the originals: 12 more offsets across the partitions.
    from tests.kafka_helpers import committed

    before = committed(fixed)
    expected_total = sum(before.values()) + 12
    components = Components.load(fixed, embedder=embedder)
    group = WorkerGroup(components, count=1)
    try:
        group.start()
        import time

        deadline = time.monotonic() + 120
        while sum(committed(fixed).values()) < expected_total and time.monotonic() < deadline:
            time.sleep(0.3)
        assert components.store.count() == 12
    finally:
        group.close()
        components.close()


def test_bad_arguments_are_explained(make_settings: Any) -> None:
    env = settings_env(make_settings())
    result = CliRunner().invoke(cli, ["dlq", "list", "--filter", "colour=red"], env=env)
    assert result.exit_code == 2 and "reason" in result.output
    result = CliRunner().invoke(cli, ["dlq", "list", "--since", "last tuesday"], env=env)
    assert result.exit_code == 2 and "duration" in result.output

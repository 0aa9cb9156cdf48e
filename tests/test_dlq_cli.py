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


def test_a_missing_broker_is_one_line_within_seconds(make_settings: Any, tmp_path: Path) -> None:
    import time

    from tests.conftest import free_port

    env = settings_env(make_settings(kafka_bootstrap_servers=f"127.0.0.1:{free_port()}"))
    for args in (["dlq", "list"], ["dlq", "replay", "--dry-run"],
                 ["publish", str(tmp_path)]):
        (tmp_path / "a.jpg").write_bytes(b"x")
        started = time.monotonic()
        result = CliRunner().invoke(cli, args, env=env)
        took = time.monotonic() - started
        assert result.exit_code == 1, (args, result.output)
        assert "no Kafka broker answers at KAFKA_BOOTSTRAP_SERVERS=" in result.output
        assert "Traceback" not in result.output and result.exception is not None
        assert took < 10, (args, took)


def test_commands_find_the_broker_a_running_up_recorded(make_settings: Any, topics: Any,
                                                        tmp_path: Path) -> None:
    """`imgsearch up` writes its broker, topics and page into its data directory; `dlq`
    beside it needs no KAFKA_* variable."""
    import subprocess
    import sys

    from kafka import KafkaProducer

    from imgsearch.stack import RunningStack, record
    from ingest_worker.dead_letters import H_REASON, H_TOPIC
    from tests.conftest import free_port

    settings = make_settings()
    topics(settings)
    data = tmp_path / "data"
    # A dead letter as a worker writes it: the original, plus error headers.
    producer = KafkaProducer(bootstrap_servers=settings.kafka_bootstrap_servers)
    producer.send(settings.kafka_dlq_topic, key=b"k1", value=b"junk", headers=[
        (H_REASON, b"invalid_json"), (H_TOPIC, settings.kafka_topic.encode())]).get(timeout=30)
    producer.close()
    # A live process stands in for the running up (a record of a dead one is ignored).
    stand_in = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        record(RunningStack(pid=stand_in.pid, api_url="http://127.0.0.1:9",
                            bootstrap=settings.kafka_bootstrap_servers,
                            topic=settings.kafka_topic, dlq_topic=settings.kafka_dlq_topic,
                            group=settings.kafka_group_id, collection="images",
                            data_dir=str(data)))
        env = {"KAFKA_BOOTSTRAP_SERVERS": None, "KAFKA_TOPIC": None, "KAFKA_DLQ_TOPIC": None}
        listed = CliRunner().invoke(cli, ["dlq", "list", "--json", "--data-dir", str(data)],
                                    env=env)
        assert listed.exit_code == 0, listed.output
        assert "1 dead letters in " + settings.kafka_dlq_topic in listed.stderr
        assert '"reason": "invalid_json"' in listed.stdout
    finally:
        stand_in.kill()
        stand_in.wait()
    # Once that process is gone, its record no longer counts: the configured broker (here
    # none) is tried, and the answer says where `up` would have recorded one.
    gone = CliRunner().invoke(cli, ["dlq", "list", "--data-dir", str(data)],
                              env={**env, "KAFKA_BOOTSTRAP_SERVERS": f"127.0.0.1:{free_port()}"})
    assert gone.exit_code == 1
    assert str(data / "imgsearch-up" / "running.json") in gone.output


def test_post_images_without_a_broker_answers_within_its_timeout(
        make_settings: Any, embedder: Any, birds: Path) -> None:
    """The API as `python -m query_api` builds it: API_PUBLISH_TIMEOUT_S bounds the whole
    wait, connecting to the broker included (it used to be 30 s whatever the setting)."""
    import time

    import httpx

    from query_api.app import create_app
    from query_api.publishing import producer_overrides
    from query_api.server import BackgroundServer
    from shared.kafka import EventPublisher, make_producer
    from tests.conftest import free_port

    settings = make_settings(kafka_bootstrap_servers=f"127.0.0.1:{free_port()}",
                             api_publish_timeout_s=2.0, api_port=free_port(), api_warmup=False)
    components = Components.load(settings, embedder=embedder)

    def make_publisher() -> EventPublisher:
        overrides = producer_overrides(settings.api_publish_timeout_s)
        return EventPublisher(settings, make_producer(settings, **overrides))

    photo = next(iter(sorted((birds / "Blue_Jay").glob("*.jpg"))))
    try:
        app = create_app(components, settings=settings, publisher_factory=make_publisher)
        with BackgroundServer(app, port=settings.api_port) as server:
            started = time.monotonic()
            response = httpx.post(f"{server.url}/images", timeout=60,
                                  files={"file": (photo.name, photo.read_bytes(), "image/jpeg")},
                                  data={"image_id": "no-broker-1"})
            took = time.monotonic() - started
    finally:
        components.close()
    assert response.status_code == 503, response.text
    assert response.json()["error"]["code"] == "broker_unavailable"
    assert took < 2.0 + 3.0, f"POST /images took {took:.1f}s with API_PUBLISH_TIMEOUT_S=2"

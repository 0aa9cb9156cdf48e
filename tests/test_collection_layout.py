"""Collection layout (shards, replicas, write consistency, on-disk storage, HNSW) and the
store's behaviour when a cluster loses part of a write.

Three real things and one stand-in:

* qdrant-client's local mode and the embedded Qdrant Edge store, for what they honour
  (local mode keeps the vector parameters; Edge writes its whole config to disk);
* a stand-in Qdrant server: an httpx transport inside this process that answers the REST
  calls QdrantClient makes, as a 1.19 server does. It records every request, so the
  settings local mode drops (shards, replicas, consistency, HNSW) are checked as the
  request the client really sent, and it can answer a write with the errors a cluster
  gives when a replica is down or the write consistency is not met. Nothing leaves the
  process: the client's URL is a loopback address that is never dialled.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from qdrant_client import QdrantClient, models

from shared.config import load_settings
from shared.errors import CollectionMismatchError, ConfigError, StoreError
from shared.store.base import CollectionLayout, CollectionSpec, PointRecord
from shared.store.edge import EdgeStore
from shared.store.qdrant import QdrantStore

DIM = 8
MODEL = {"model_name": "test-model", "preprocessing": {"size": 8}}
CLUSTER = CollectionLayout(shards=6, replication_factor=2, write_consistency=1,
                           write_ordering="medium", on_disk_vectors=True, on_disk_payload=True,
                           hnsw_m=32, hnsw_ef_construct=200)
URL = "http://127.0.0.1:6333"  # never dialled: the transport below answers in-process


def spec(layout: CollectionLayout = CLUSTER, **kw: Any) -> CollectionSpec:
    return CollectionSpec("images", DIM, MODEL, layout=layout, **kw)


def records(n: int) -> list[PointRecord]:
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        v = rng.normal(size=DIM).astype(np.float32)
        out.append(PointRecord(f"img-{i}", v / np.linalg.norm(v),
                               {"image_id": f"img-{i}", "uri": f"file:///x/{i}.jpg"}))
    return out


# -- a Qdrant server in this process -------------------------------------------------------------

# What a Qdrant 1.19 cluster answers when part of a write fails, word for word from its
# replica set (lib/collection/src/shards/replica_set/update.rs): a service error is HTTP 500
# with the message in status.error. The last two come from what sits in front of Qdrant.
REPLICA_DOWN = (500, ("Service internal error: The replica set for shard 3 on peer 2 has no "
                      "active replica"))
CONSISTENCY_NOT_MET = (500, ("Service internal error: Failed to apply operation to at least one "
                             "`Active` replica. Consistency of this update is not guaranteed. "
                             "Please retry. Failed peer: 2, error: Service internal error: "
                             "transport error"))
DEACTIVATION_TIMED_OUT = (500, ("Service internal error: Some replica of shard 1 failed to apply "
                                "operation and deactivation timed out after 30s. Consistency of "
                                "this update is not guaranteed. Please retry."))
NO_LEADER = (500, ("Service internal error: Cannot update shard images:4 with Medium ordering "
                   "because no leader could be selected"))
NO_UPSTREAM = (503, "no healthy upstream")  # a load balancer with every Qdrant pod gone
CONNECTION_REFUSED = (0, "connection refused")  # the node behind the address is down


def ok(result: Any) -> httpx.Response:
    return httpx.Response(200, json={"result": result, "status": "ok", "time": 0.001})


class FakeQdrant:
    """The REST endpoints QdrantStore uses, with a script of failures for writes.

    ``failures`` are (status, message) pairs answered to the next writes, in order. A
    failed write is still applied first, as on the replicas that did take it: retrying it
    must then be harmless.
    """

    def __init__(self, existing: models.CollectionInfo | None = None) -> None:
        self.requests: list[httpx.Request] = []
        self.created: dict[str, Any] | None = None
        self.existing = existing
        self.points: dict[str, dict[str, Any]] = {}
        self.failures: list[tuple[int, str]] = []
        self.writes = 0
        self.race = False

    def client(self) -> QdrantClient:
        return QdrantClient(url=URL, check_compatibility=False,
                            transport=httpx.MockTransport(self.handle))

    def handle(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        path, method = request.url.path, request.method
        if path == "/collections/images/exists":
            if self.race:  # it does not exist yet when asked, and does when created
                self.race = False
                return ok({"exists": False})
            return ok({"exists": self.existing is not None or self.created is not None})
        if path == "/collections/images" and method == "PUT":
            if self.existing is not None:  # another process created it first
                return httpx.Response(409, json={"status": {
                    "error": "Collection `images` already exists!"}, "time": 0.0})
            self.created = json.loads(request.content)
            return ok(True)
        if path == "/collections/images" and method == "GET":
            assert self.existing is not None, "GET of a collection the test did not give"
            return ok(self.existing.model_dump(mode="json", exclude_none=True))
        if path == "/collections/images/index":
            return ok({"operation_id": 1, "status": "completed"})
        if path == "/collections/images/points/batch":
            return self.batch(request)
        return httpx.Response(404, json={"status": {"error": f"no route {method} {path}"}})

    def batch(self, request: httpx.Request) -> httpx.Response:
        self.writes += 1
        operations = json.loads(request.content)["operations"]
        for op in operations:
            if "upsert" in op:
                for point in op["upsert"]["points"]:
                    self.points[point["id"]] = point["payload"]
            elif "delete" in op and "points" in op["delete"]:
                for pid in op["delete"]["points"]:
                    self.points.pop(pid, None)
        if self.failures:
            status, message = self.failures.pop(0)
            if status == 0:
                raise httpx.ConnectError(message, request=request)
            return httpx.Response(status, json={"status": {"error": message}, "time": 0.01})
        return ok([{"operation_id": self.writes, "status": "completed"} for _ in operations])


def existing(*, shards: int = 6, replicas: int = 2, consistency: int = 1, on_disk: bool = True,
             on_disk_payload: bool = True, m: int = 32, ef: int = 200) -> models.CollectionInfo:
    """A collection as GET /collections/images describes it."""
    return models.CollectionInfo(
        status=models.CollectionStatus.GREEN, optimizer_status=models.OptimizersStatusOneOf.OK,
        segments_count=6, points_count=0, indexed_vectors_count=0,
        payload_schema={"parent_image_id": models.PayloadIndexInfo(
            data_type=models.PayloadSchemaType.KEYWORD, points=0)},
        config=models.CollectionConfig(
            params=models.CollectionParams(
                vectors=models.VectorParams(size=DIM, distance=models.Distance.COSINE,
                                            on_disk=on_disk),
                shard_number=shards, replication_factor=replicas,
                write_consistency_factor=consistency, on_disk_payload=on_disk_payload),
            hnsw_config=models.HnswConfig(m=m, ef_construct=ef, full_scan_threshold=10000),
            optimizer_config=models.OptimizersConfig(
                deleted_threshold=0.2, vacuum_min_vector_number=1000, default_segment_number=0,
                flush_interval_sec=5),
            wal_config=models.WalConfig(wal_capacity_mb=32, wal_segments_ahead=0),
            metadata=spec().metadata()))


# -- settings reach the collection ---------------------------------------------------------------


def test_settings_become_the_collection_layout(monkeypatch: pytest.MonkeyPatch) -> None:
    from shared.components import collection_spec

    env = {"QDRANT_SHARDS": "6", "QDRANT_REPLICATION_FACTOR": "2",
           "QDRANT_WRITE_CONSISTENCY": "1", "QDRANT_WRITE_ORDERING": "medium",
           "QDRANT_ON_DISK_VECTORS": "true", "QDRANT_ON_DISK_PAYLOAD": "true",
           "QDRANT_HNSW_M": "32", "QDRANT_HNSW_EF_CONSTRUCT": "200"}
    for key, value in env.items():
        monkeypatch.setenv(key, value)

    class Info:
        def as_metadata(self) -> dict[str, Any]:
            return dict(MODEL)

    class Embedder:  # what collection_spec reads of the model
        dim = DIM
        info = Info()

    built = collection_spec(load_settings(), Embedder())  # type: ignore[arg-type]
    assert built.layout == CLUSTER


def test_write_consistency_above_the_replicas_is_refused_at_start() -> None:
    with pytest.raises(ConfigError, match="QDRANT_WRITE_CONSISTENCY=3 exceeds "
                                          "QDRANT_REPLICATION_FACTOR=2"):
        load_settings(qdrant_replication_factor=2, qdrant_write_consistency=3)


def test_server_collection_is_created_with_the_layout() -> None:
    server = FakeQdrant()
    QdrantStore(server.client(), spec(quantization="int8", indexing_threshold_kb=1000)).close()
    body = server.created
    assert body is not None
    assert body["shard_number"] == 6
    assert body["replication_factor"] == 2
    assert body["write_consistency_factor"] == 1
    assert body["on_disk_payload"] is True
    assert body["vectors"] == {"size": DIM, "distance": "Cosine", "on_disk": True}
    assert body["hnsw_config"] == {"m": 32, "ef_construct": 200}
    # What was already there still is: quantization, indexing threshold, our metadata.
    assert body["quantization_config"]["scalar"]["type"] == "int8"
    assert body["optimizers_config"] == {"indexing_threshold": 1000}
    assert body["metadata"]["imgsearch"]["model_name"] == "test-model"


def test_unset_layout_sends_nothing_and_leaves_qdrant_defaults() -> None:
    server = FakeQdrant()
    QdrantStore(server.client(), spec(CollectionLayout())).close()
    assert server.created is not None
    for key in ("shard_number", "replication_factor", "write_consistency_factor",
                "on_disk_payload", "hnsw_config"):
        assert key not in server.created, key
    assert "on_disk" not in server.created["vectors"]


def test_every_write_carries_the_ordering_and_waits() -> None:
    server = FakeQdrant()
    store = QdrantStore(server.client(), spec())
    store.upsert(records(3))
    store.delete(["img-1"])
    writes = [r for r in server.requests if r.url.path.endswith("/points/batch")]
    assert len(writes) == 2
    for request in writes:
        assert request.url.params["ordering"] == "medium"
        assert request.url.params["wait"] == "true"
    assert sorted(p["image_id"] for p in server.points.values()) == ["img-0", "img-2"]


def test_local_mode_keeps_what_it_honours(tmp_path: Path) -> None:
    """qdrant-client's local mode keeps the vector parameters (on_disk among them) and
    drops the cluster settings, which the request test above covers."""
    QdrantStore(QdrantClient(path=str(tmp_path)), spec()).close()
    client = QdrantClient(path=str(tmp_path))
    try:
        vectors = client.get_collection("images").config.params.vectors
        assert isinstance(vectors, models.VectorParams) and vectors.on_disk is True
    finally:
        client.close()
    # Reopening with the same layout: nothing it cannot check is held against it.
    QdrantStore(QdrantClient(path=str(tmp_path)), spec()).close()


def test_embedded_store_builds_with_hnsw_and_on_disk_settings(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="shared.store.edge")
    store = EdgeStore(tmp_path, spec())
    store.upsert(records(20))
    store.close()
    built = json.loads((tmp_path / "images" / "shard" / "edge_config.json").read_text())
    assert built["hnsw_config"]["m"] == 32 and built["hnsw_config"]["ef_construct"] == 200
    assert built["vectors"][""]["on_disk"] is True
    assert built["on_disk_payload"] is True
    said = caplog.text
    for name in ("QDRANT_SHARDS=6", "QDRANT_REPLICATION_FACTOR=2", "QDRANT_WRITE_CONSISTENCY=1",
                 "QDRANT_WRITE_ORDERING=medium"):
        assert name in said, f"the embedded store should say it ignores {name}"

    caplog.clear()
    reopened = EdgeStore(tmp_path, spec(CollectionLayout(hnsw_m=16)))
    try:
        assert reopened.count() == 20
    finally:
        reopened.close()
    assert "QDRANT_HNSW_M=32, not 16" in caplog.text


# -- an existing collection with another layout --------------------------------------------------


@pytest.mark.parametrize(("stored", "variable", "keep"), [
    ({"shards": 1}, "QDRANT_SHARDS=6", "QDRANT_SHARDS=1"),
    ({"replicas": 1}, "QDRANT_REPLICATION_FACTOR=2", "QDRANT_REPLICATION_FACTOR=1"),
])
def test_other_shards_or_replicas_refuse_to_start_and_say_what_to_do(
        stored: dict[str, int], variable: str, keep: str) -> None:
    server = FakeQdrant(existing(**stored))
    with pytest.raises(CollectionMismatchError) as caught:
        QdrantStore(server.client(), spec())
    message = str(caught.value)
    assert variable in message and keep in message
    assert "docs/operations.md" in message
    assert caught.value.retriable is False  # a worker stops instead of retrying forever
    assert server.writes == 0


@pytest.mark.parametrize(("stored", "variable", "patch"), [
    ({"consistency": 2}, "QDRANT_WRITE_CONSISTENCY=1",
     '{"params": {"write_consistency_factor": 1}}'),
    ({"on_disk": False}, "QDRANT_ON_DISK_VECTORS=True", '{"vectors": {"": {"on_disk": true}}}'),
    ({"on_disk_payload": False}, "QDRANT_ON_DISK_PAYLOAD=True",
     '{"params": {"on_disk_payload": true}}'),
    ({"m": 16}, "QDRANT_HNSW_M=32", '{"hnsw_config": {"m": 32}}'),
    ({"ef": 100}, "QDRANT_HNSW_EF_CONSTRUCT=200", '{"hnsw_config": {"ef_construct": 200}}'),
])
def test_adjustable_settings_warn_with_the_request_that_changes_them(
        stored: dict[str, Any], variable: str, patch: str,
        caplog: pytest.LogCaptureFixture) -> None:
    server = FakeQdrant(existing(**stored))
    QdrantStore(server.client(), spec()).close()
    assert variable in caplog.text
    assert f"PATCH /collections/images {patch}" in caplog.text


def test_replicas_starting_together_open_what_the_first_created() -> None:
    """Workers and API replicas start at once: the ones that lose the race to create the
    collection open it, and check it like any existing one."""
    server = FakeQdrant(existing())
    server.race = True
    store = QdrantStore(server.client(), spec())
    assert server.created is None  # its create was refused with 409
    assert store.stored_metadata == spec().metadata()
    store.close()
    server = FakeQdrant(existing(shards=3))
    server.race = True
    with pytest.raises(CollectionMismatchError, match="QDRANT_SHARDS=6"):
        QdrantStore(server.client(), spec())


def test_matching_or_unset_layout_opens_quietly(caplog: pytest.LogCaptureFixture) -> None:
    QdrantStore(FakeQdrant(existing()).client(), spec()).close()
    QdrantStore(FakeQdrant(existing(shards=1, replicas=1, m=8)).client(),
                spec(CollectionLayout())).close()
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


# -- partial write failures in a cluster ---------------------------------------------------------


def write_until_stored(write: Callable[[], None], *, attempts: int = 10) -> list[StoreError]:
    """What the ingest worker does with a failed batch (shared/pipeline/retry.py): retry
    while the error says it is retriable. Returns the errors it waited out."""
    errors: list[StoreError] = []
    for _ in range(attempts):
        try:
            write()
            return errors
        except StoreError as exc:
            if not exc.retriable:
                raise
            errors.append(exc)
    raise AssertionError(f"still failing after {attempts} attempts: {errors[-1]}")


CLUSTER_FAILURES = [REPLICA_DOWN, CONSISTENCY_NOT_MET, DEACTIVATION_TIMED_OUT, NO_LEADER,
                    NO_UPSTREAM, CONNECTION_REFUSED]


@pytest.mark.parametrize("failure", CLUSTER_FAILURES,
                         ids=["replica-down", "consistency-not-met", "deactivation-timeout",
                              "no-leader", "no-upstream", "connection-refused"])
def test_a_partial_write_failure_is_a_retriable_store_error(failure: tuple[int, str]) -> None:
    server = FakeQdrant()
    store = QdrantStore(server.client(), spec())
    server.failures = [failure]
    with pytest.raises(StoreError) as caught:
        store.upsert(records(4))
    assert caught.value.retriable is True
    assert caught.value.reason == "store_unavailable"
    assert failure[1].split(":")[0] in str(caught.value)  # the server's own words reach the log


def test_retries_recover_from_a_run_of_cluster_failures_without_duplicates() -> None:
    server = FakeQdrant()
    store = QdrantStore(server.client(), spec())
    batch = records(16)
    # Every failure applied the write on some replica before answering: the retries
    # rewrite the same points, which must neither duplicate nor lose any of them.
    server.failures = list(CLUSTER_FAILURES)
    waited = write_until_stored(lambda: store.upsert(batch))
    assert len(waited) == len(CLUSTER_FAILURES)
    assert all(e.retriable for e in waited)
    assert server.writes == len(CLUSTER_FAILURES) + 1
    assert sorted(p["image_id"] for p in server.points.values()) == sorted(
        r.image_id for r in batch)
    # Deletes take the same path.
    server.failures = [REPLICA_DOWN, CONSISTENCY_NOT_MET]
    assert len(write_until_stored(lambda: store.delete(["img-0", "img-1"]))) == 2
    assert len(server.points) == len(batch) - 2


# -- the cluster's Kafka producer ----------------------------------------------------------------


def test_producer_is_idempotent_with_acks_all_and_still_publishes(make_settings: Any,
                                                                 topics: Any) -> None:
    """The API and CLI publish through make_producer: acks=all and idempotence on, so a
    retried send after a lost acknowledgement is written once (brokers dedupe by producer
    id and sequence). The Tansu broker of the other tests accepts such a producer."""
    from kafka import KafkaConsumer

    from shared.kafka import EventPublisher, make_producer

    settings = make_settings()
    topics(settings, partitions=1)
    producer = make_producer(settings)
    assert producer.config["enable_idempotence"] is True
    assert producer.config["acks"] == -1  # "all"
    publisher = EventPublisher(settings, producer)
    try:
        sent = [publisher.publish_and_wait(
            {"specversion": "1.0", "type": "image.deleted", "source": "test",
             "id": f"event-{i}", "data": {"image_id": f"img-{i}"}}) for i in range(5)]
    finally:
        publisher.close()
    assert [m.offset for m in sent] == list(range(sent[0].offset, sent[0].offset + 5))
    consumer = KafkaConsumer(settings.kafka_topic,
                             bootstrap_servers=settings.kafka_bootstrap_servers,
                             auto_offset_reset="earliest", consumer_timeout_ms=5000)
    try:
        keys = [m.key for m in consumer]
    finally:
        consumer.close()
    assert keys == [f"img-{i}".encode() for i in range(5)]

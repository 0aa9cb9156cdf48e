"""The Grafana dashboards and the alert rules against the metrics the code exports.

1. Statically: every metric (and label) a panel or an alert uses is one that
   ingest_worker.metrics / query_api.metrics register, so renaming a metric fails here.
2. Live: a real Prometheus scrapes a running worker and API (the Tansu broker and the
   embedded store stand in for Kafka and Qdrant) after real photos were ingested and
   searched; then every panel expression must return data and every alert expression
   must evaluate without error, through Prometheus' HTTP API, as Grafana would ask.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.conftest import REPO, free_port, wait_for_port
from tests.kafka_helpers import publish, send_raw
from tests.promql import (
    DCGM_LABELS,
    DCGM_METRICS,
    PROMETHEUS_CONFIG,
    PROMETHEUS_SYNTHETIC,
    TARGET_LABELS,
    Query,
    alert_queries,
    alert_rules,
    dashboard_queries,
    exported_metrics,
    label_names,
    metric_names,
)

pytestmark = pytest.mark.timeout(600)


# -- static: names ------------------------------------------------------------------------------


def test_promql_reader_finds_metrics_and_labels() -> None:
    expr = ('histogram_quantile(0.99, sum by (le, route) (rate(imgsearch_api_request_duration_'
            'seconds_bucket{route!~"/metrics|/healthz", status="5.."}[$__rate_interval])))'
            ' / on () group_left sum(up{job="x"} offset 5m) and vector(0)')
    assert metric_names(expr) == {"imgsearch_api_request_duration_seconds_bucket", "up"}
    assert label_names(expr) == {"le", "route", "status", "job"}
    assert metric_names("deriv(sum(x_total)[15m:1m]) > 0 unless y") == {"x_total", "y"}


def all_queries() -> list[Query]:
    return dashboard_queries() + alert_queries()


def test_there_is_something_to_check() -> None:
    queries = dashboard_queries()
    assert len(queries) >= 30, "the dashboard lost its panels"
    assert {r["alert"] for r in alert_rules()} >= {
        "IngestLagHigh", "IngestLagGrowing", "IngestDeadLetters", "IngestWorkerNotConsuming",
        "QueryApiErrorRatio", "QueryApiLatencyHigh", "TargetDown", "IngestInternalErrors",
        "QueryApiOverloaded",
    }


@pytest.mark.parametrize("query", all_queries(), ids=lambda q: q.where)
def test_every_metric_used_is_exported(query: Query) -> None:
    exported = exported_metrics()
    used = metric_names(query.expr)
    assert used, f"{query.where}: no metric found in {query.expr!r}"
    unknown = used - exported.names - PROMETHEUS_SYNTHETIC - DCGM_METRICS
    assert not unknown, (
        f"{query.where} uses {sorted(unknown)}, which no code exports. Exported imgsearch "
        f"metrics: {sorted(n for n in exported.names if n.startswith('imgsearch_'))}"
    )


@pytest.mark.parametrize("query", all_queries(), ids=lambda q: q.where)
def test_every_label_used_exists(query: Query) -> None:
    exported = exported_metrics()
    known = set(TARGET_LABELS)
    for name in metric_names(query.expr):
        known |= exported.labels.get(name, set())
        if name in DCGM_METRICS:
            known |= DCGM_LABELS
    unknown = label_names(query.expr) - known
    assert not unknown, f"{query.where} uses labels {sorted(unknown)} that its metrics lack"


# -- live: a real Prometheus over a running worker and API --------------------------------------


def prometheus_binary() -> str:
    path = shutil.which("prometheus")
    if path is None:
        message = "prometheus is not on PATH (apt-get install -y prometheus)"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return path


def stack_env(settings: Any) -> dict[str, str]:
    """The environment `python -m tests.observed_stack` reads its Settings from."""
    env = {k: v for k, v in os.environ.items() if k.upper() not in {
        name.upper() for name in type(settings).model_fields}}
    env.update({
        "KAFKA_BOOTSTRAP_SERVERS": settings.kafka_bootstrap_servers,
        "KAFKA_TOPIC": settings.kafka_topic,
        "KAFKA_DLQ_TOPIC": settings.kafka_dlq_topic,
        "KAFKA_GROUP_ID": settings.kafka_group_id,
        "KAFKA_MAX_POLL_INTERVAL_MS": str(settings.kafka_max_poll_interval_ms),
        "KAFKA_SESSION_TIMEOUT_MS": str(settings.kafka_session_timeout_ms),
        "KAFKA_HEARTBEAT_INTERVAL_MS": str(settings.kafka_heartbeat_interval_ms),
        "QDRANT_PATH": str(settings.qdrant_path),
        "MODEL_NAME": settings.model_name,
        "MODEL_WEIGHTS": str(settings.model_weights),
        "DEVICE": "cpu",
        "IMAGE_FILE_ROOTS": ",".join(str(r) for r in settings.image_file_roots),
        "BATCH_SIZE": str(settings.batch_size),
        "BATCH_MAX_WAIT_MS": str(settings.batch_max_wait_ms),
        "LOG_LEVEL": "INFO",
    })
    return env


class Process:
    """A subprocess with its output in a file, stopped with SIGTERM (then SIGKILL)."""

    def __init__(self, args: list[str], log: Path, **kwargs: Any) -> None:
        self.log = log
        self._out = log.open("wb")
        self.proc = subprocess.Popen(args, stdout=self._out, stderr=subprocess.STDOUT, **kwargs)

    def tail(self, n: int = 60) -> str:
        lines = self.log.read_text(errors="replace").splitlines()
        return "\n".join(lines[-n:])

    def check_alive(self) -> None:
        if self.proc.poll() is not None:
            raise AssertionError(f"{self.proc.args[0]} exited with {self.proc.returncode}:\n"
                                 f"{self.tail()}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._out.close()


def prometheus_config(path: Path, worker_port: int, api_port: int, prom_port: int) -> Path:
    """The shipped prometheus.yml, pointed at loopback and scraping every second.

    Job names and the rule file stay the shipped ones: the dashboards and alerts select
    by job. Docker DNS discovery becomes static loopback targets; the DCGM exporter (GPU
    hosts only) and Alertmanager are not part of this stack."""
    shipped = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    targets = {"ingest-worker": worker_port, "query-api": api_port, "prometheus": prom_port}
    jobs = []
    for job in shipped["scrape_configs"]:
        name = job["job_name"]
        if name not in targets:
            continue
        job = {k: v for k, v in job.items() if not k.endswith("_sd_configs")
               and k != "static_configs"}
        job["static_configs"] = [{"targets": [f"127.0.0.1:{targets[name]}"]}]
        jobs.append(job)
    assert {j["job_name"] for j in jobs} == set(targets), "a shipped job is missing"
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(PROMETHEUS_CONFIG.parent / f) for f in shipped["rule_files"]],
        "scrape_configs": jobs,
    }
    path.write_text(yaml.safe_dump(config))
    return path


class PromAPI:
    def __init__(self, port: int) -> None:
        self.base = f"http://127.0.0.1:{port}"
        self.client = httpx.Client(base_url=self.base, timeout=30)

    def query(self, expr: str) -> dict[str, Any]:
        response = self.client.get("/api/v1/query", params={"query": expr})
        body = response.json()
        if response.status_code != 200 or body.get("status") != "success":
            raise AssertionError(f"Prometheus refused {expr!r}: {response.status_code} {body}")
        return body["data"]

    def vector(self, expr: str) -> list[dict[str, Any]]:
        data = self.query(expr)
        if data["resultType"] in ("scalar", "string"):
            return [{"metric": {}, "value": data["result"]}]
        return data["result"]

    def value(self, expr: str) -> float:
        result = self.vector(expr)
        return float(result[0]["value"][1]) if result else 0.0

    def wait_for(self, expr: str, what: str, check: Callable[[float], bool],
                 processes: list[Process], timeout_s: float = 120) -> float:
        deadline = time.monotonic() + timeout_s
        value = 0.0
        while time.monotonic() < deadline:
            for p in processes:
                p.check_alive()
            value = self.value(expr)
            if check(value):
                return value
            time.sleep(0.5)
        raise AssertionError(f"{what}: {expr} = {value} after {timeout_s}s")


@pytest.fixture
def stack(make_settings: Callable[..., Any], topics: Callable[..., None], tmp_path: Path,
          birds: Path) -> Iterator[tuple[Any, PromAPI, str, list[Process]]]:
    prometheus = prometheus_binary()
    settings = make_settings()
    topics(settings, partitions=4)
    worker_port, api_port, prom_port = free_port(), free_port(), free_port()
    processes: list[Process] = []
    try:
        app = Process([sys.executable, "-m", "tests.observed_stack",
                       "--worker-metrics-port", str(worker_port), "--api-port", str(api_port)],
                      tmp_path / "stack.log", cwd=REPO, env=stack_env(settings))
        processes.append(app)
        config = prometheus_config(tmp_path / "prometheus.yml", worker_port, api_port, prom_port)
        prom = Process([prometheus, f"--config.file={config}",
                        f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                        f"--web.listen-address=127.0.0.1:{prom_port}", "--log.level=warn"],
                       tmp_path / "prometheus.log")
        processes.append(prom)
        wait_for_port(prom_port, 30)
        deadline = time.monotonic() + 180  # the model loads before the API listens
        while True:
            app.check_alive()
            try:
                if httpx.get(f"http://127.0.0.1:{api_port}/readyz", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, f"the API never got ready:\n{app.tail()}"
            time.sleep(0.5)
        api = PromAPI(prom_port)
        try:
            yield settings, api, f"http://127.0.0.1:{api_port}", processes
        finally:
            api.client.close()
    finally:
        for p in reversed(processes):
            p.stop()


def test_every_panel_returns_data_and_every_alert_evaluates(
    stack: tuple[Any, PromAPI, str, list[Process]], birds: Path, tmp_path: Path
) -> None:
    from shared.events import upload_event

    settings, prom, api, processes = stack
    photos = sorted(birds.glob("*/*.jpg"))[:40]
    assert len(photos) == 40, f"expected bird photos under {birds}"

    # Ingest: real photos, plus events that must end in the dead-letter topic.
    not_an_image = tmp_path / "notes.jpg"
    not_an_image.write_text("these are notes, not a JPEG")
    publish(settings, [upload_event(f"birds/{p.parent.name}/{p.name}", uri=p.as_uri(),
                                    metadata={"label": p.parent.name}) for p in photos])
    publish(settings, [
        upload_event("missing", uri=(tmp_path / "missing.jpg").as_uri()),
        upload_event("notes", uri=not_an_image.as_uri()),
    ])
    send_raw(settings, [(b"garbage", b"{this is not json")])
    total = len(photos) + 3
    prom.wait_for('sum(imgsearch_ingest_events_total{job="ingest-worker"})',
                  "events the worker consumed, as Prometheus sees them",
                  lambda v: v >= total, processes)

    # Query: searches by photo and by stored id, and requests the API must refuse.
    with httpx.Client(base_url=api, timeout=60) as client:
        for photo in photos[:6]:
            r = client.post("/search", content=photo.read_bytes(),
                            headers={"Content-Type": "image/jpeg"})
            assert r.status_code == 200, r.text
            assert r.json()["hits"], "a search over 40 stored birds found nothing"
        for photo in photos[6:9]:
            image_id = f"birds/{photo.parent.name}/{photo.name}"
            assert client.get(f"/images/{image_id}/similar").status_code == 200
            assert client.get(f"/images/{image_id}").status_code == 200
        assert client.get("/images/no-such-image").status_code == 404
        assert client.post("/search", content=b"not an image",
                           headers={"Content-Type": "image/jpeg"}).status_code in (400, 422)
        assert client.get("/count").json()["count"] == len(photos)
    prom.wait_for('sum(imgsearch_api_requests_total{job="query-api", route="/search"})',
                  "searches the API answered, as Prometheus sees them",
                  lambda v: v >= 7, processes)
    # The lag gauge is refreshed every few seconds by each worker.
    prom.wait_for('count(imgsearch_ingest_consumer_lag_records{job="ingest-worker"})',
                  "partitions with a lag measurement (is ingest_worker.lag.LagReporter "
                  "driven by the worker loop?)", lambda v: v >= 4, processes, timeout_s=60)
    time.sleep(3)  # a few more scrapes, so rates over the window see the latest counts

    # Every panel: evaluates, and returns at least one series (GPU panels: no GPU here).
    problems = []
    for query in dashboard_queries():
        try:
            result = prom.vector(query.promql)
        except AssertionError as exc:
            problems.append(f"{query.where}: {exc}")
            continue
        if not result and not query.external:
            problems.append(f"{query.where}: no data for {query.promql}")
    # Every alert: evaluates without error (most are rightly empty on a healthy stack).
    for query in alert_queries():
        try:
            prom.query(query.promql)
        except AssertionError as exc:
            problems.append(f"{query.where}: {exc}")
    assert not problems, "\n".join(problems)

    # What the panels show is what happened.
    dlq = {s["metric"]["reason"] for s in prom.vector(
        'sum by (reason) (imgsearch_ingest_dlq_events_total{job="ingest-worker"})')}
    assert {"invalid_json", "not_found", "undecodable"} <= dlq
    # A redelivery after a rebalance may store an image twice; never fewer than once.
    assert prom.value('sum(imgsearch_ingest_events_total{job="ingest-worker", outcome="stored"})'
                      ) >= len(photos)
    assert prom.value('max(imgsearch_api_stored_images{job="query-api"})') == len(photos)
    routes = {s["metric"]["route"] for s in prom.vector(
        'sum by (route) (imgsearch_api_request_duration_seconds_count{job="query-api"})')}
    assert {"/search", "/images/{image_id}/similar", "/images/{image_id}"} <= routes
    partitions = {s["metric"]["partition"] for s in prom.vector(
        f'imgsearch_ingest_consumer_lag_records{{topic="{settings.kafka_topic}"}}')}
    assert partitions == {"0", "1", "2", "3"}

    # Prometheus loaded the shipped rule file and evaluates every rule without error.
    deadline = time.monotonic() + 30
    while True:
        groups = prom.client.get("/api/v1/rules").json()["data"]["groups"]
        rules = [r for g in groups for r in g["rules"]]
        if rules and all(r.get("health") == "ok" for r in rules):
            break
        assert time.monotonic() < deadline, json.dumps(
            [(r["name"], r.get("health"), r.get("lastError")) for r in rules], indent=1)
        time.sleep(1)
    assert {r["name"] for r in rules} == {r["alert"] for r in alert_rules()}

    # Every metric a panel uses reached Prometheus from the running code.
    names = set(prom.client.get("/api/v1/label/__name__/values").json()["data"])
    missing = {n for q in dashboard_queries() + alert_queries() for n in metric_names(q.expr)}
    missing -= names | DCGM_METRICS
    assert not missing, f"never scraped: {sorted(missing)}"


def test_grafana_variables_are_all_known() -> None:
    """The live test can only evaluate variables it knows how to fill in."""
    for query in dashboard_queries():
        assert "$" not in query.promql, query.where

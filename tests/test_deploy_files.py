"""docker-compose.yml and deploy/: valid, and every reference in them resolves.

Docker cannot run here (no engine in CI), so the stack itself is never started by a test.
What can be checked without it is checked with the real tools or the real specs:
promtool and amtool on the Prometheus and Alertmanager files, the Compose Specification's
JSON schema on the compose file, and every name, port, file and image the files refer to.
"""

from __future__ import annotations

import fnmatch
import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jsonschema
import pytest
import yaml

from tests.promql import DASHBOARDS, PROMETHEUS_CONFIG, REPO, panels

COMPOSE = REPO / "docker-compose.yml"
# The cluster topology (3 Kafka brokers, 3 Qdrant nodes): docs/scaling.md.
CLUSTER_COMPOSE = REPO / "deploy" / "compose-cluster.yml"
COMPOSE_FILES = {"single": COMPOSE, "cluster": CLUSTER_COMPOSE}
SCHEMA = REPO / "deploy" / "schema" / "compose-spec.json"
ALERTMANAGER_CONFIG = REPO / "deploy" / "alertmanager" / "alertmanager.yml"
GRAFANA = REPO / "deploy" / "grafana"
OPERATIONS = REPO / "docs" / "operations.md"
OUR_IMAGES = ("imgsearch:", "imgsearch-cuda:")


def tool(name: str, package: str) -> str:
    path = shutil.which(name)
    if path is None:
        message = f"{name} is not on PATH (apt-get install -y {package})"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return path


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=60, check=False)


# -- the real tools --------------------------------------------------------------------------------


def test_promtool_accepts_the_prometheus_config() -> None:
    result = run(tool("promtool", "prometheus"), "check", "config", str(PROMETHEUS_CONFIG))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout + result.stderr


def test_promtool_accepts_the_alert_rules() -> None:
    rules = PROMETHEUS_CONFIG.parent / "alerts.yml"
    result = run(tool("promtool", "prometheus"), "check", "rules", str(rules))
    assert result.returncode == 0, result.stdout + result.stderr
    assert re.search(r"SUCCESS: [1-9]\d* rules found", result.stdout + result.stderr)


def test_amtool_accepts_the_alertmanager_config() -> None:
    result = run(tool("amtool", "prometheus-alertmanager"), "check-config",
                 str(ALERTMANAGER_CONFIG))
    assert result.returncode == 0, result.stdout + result.stderr


# -- compose: interpolation as Compose does it, with every variable unset ----------------------------

_VAR = re.compile(r"\$\$|\$\{([A-Za-z_]\w*)(?:(:?[-?+])([^}]*))?\}|\$([A-Za-z_]\w*)")


def interpolate(value: Any, env: dict[str, str]) -> Any:
    """Compose's variable substitution (spec: interpolation), recursively."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def one(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        name = m.group(1) or m.group(4)
        op, arg = m.group(2), m.group(3) or ""
        current = env.get(name)
        empty = current is None or (op is not None and op.startswith(":") and current == "")
        if op in ("-", ":-"):
            return arg if empty else current  # type: ignore[return-value]
        if op in ("?", ":?"):
            if empty:
                raise AssertionError(f"${{{name}}} is required: {arg}")
            return current  # type: ignore[return-value]
        if op in ("+", ":+"):
            return "" if empty else arg
        if current is None:
            raise AssertionError(f"${name} has no default: Compose would substitute ''")
        return current

    return _VAR.sub(one, value)


@pytest.fixture(scope="module")
def raw() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())  # resolves anchors and << merges like Compose


@pytest.fixture(scope="module")
def compose(raw: dict[str, Any]) -> dict[str, Any]:
    return interpolate(raw, {})


class ComposeFile:
    """One compose file as written and after interpolation; relative paths in it are
    relative to its folder (Compose's project directory)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.base = path.parent
        self.raw = yaml.safe_load(path.read_text())
        self.doc = interpolate(self.raw, {})


@pytest.fixture(scope="module", params=sorted(COMPOSE_FILES), ids=sorted(COMPOSE_FILES))
def any_compose(request: pytest.FixtureRequest) -> ComposeFile:
    """Each compose file in turn, for the checks every one of them must pass."""
    return ComposeFile(COMPOSE_FILES[request.param])


@pytest.fixture(scope="module")
def cluster() -> dict[str, Any]:
    return ComposeFile(CLUSTER_COMPOSE).doc


def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return compose["services"]


def env_of(service: dict[str, Any]) -> dict[str, Any]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        return dict(item.split("=", 1) if "=" in item else (item, None) for item in env)
    return env


def container_ports(service: dict[str, Any]) -> dict[int, int]:
    """Published ports as {container port: host port}."""
    out = {}
    for spec in service.get("ports", []):
        parts = str(spec).split(":")
        out[int(parts[-1].split("/")[0])] = int(parts[-2])
    return out


def url_port(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    assert parts.hostname and parts.port, url
    return parts.hostname, parts.port


def healthcheck_text(service: dict[str, Any]) -> str:
    test = service["healthcheck"]["test"]
    return " ".join(test) if isinstance(test, list) else test


def test_compose_file_follows_the_compose_specification(any_compose: ComposeFile) -> None:
    schema = json.loads(SCHEMA.read_text())
    validator = jsonschema.validators.validator_for(schema)(schema)
    for name, doc in (("as written", any_compose.raw), ("after interpolation", any_compose.doc)):
        errors = sorted(validator.iter_errors(doc), key=lambda e: list(e.absolute_path))
        assert not errors, f"{name}:\n" + "\n".join(
            f"  {'/'.join(map(str, e.absolute_path))}: {e.message}" for e in errors[:20])


def test_the_stack_has_every_part(compose: dict[str, Any]) -> None:
    s = services(compose)
    assert set(s) >= {"kafka", "kafka-init", "qdrant", "ingest-worker", "ingest-worker-gpu",
                      "query-api", "prometheus", "alertmanager", "grafana"}
    assert s["kafka"]["image"].startswith("apache/kafka:")
    assert env_of(s["kafka"])["KAFKA_PROCESS_ROLES"] == "broker,controller"  # KRaft, no ZK
    assert int(s["ingest-worker"]["deploy"]["replicas"]) >= 1
    gpu = s["ingest-worker-gpu"]
    assert gpu["profiles"] == ["gpu"]
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert devices and devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
    assert env_of(gpu)["DEVICE"] == "cuda"
    assert s["ingest-worker"]["command"] == ["python", "-m", "ingest_worker"]
    assert s["query-api"]["command"] == ["python", "-m", "query_api"]


def test_images_are_pinned(any_compose: ComposeFile) -> None:
    for name, service in services(any_compose.doc).items():
        image = service.get("image")
        assert image, f"{name} has no image (a built service needs one to tag its build)"
        match = re.fullmatch(r"(?:[\w.\-]+(?::\d+)?/)?[\w.\-/]+:([\w][\w.\-]{0,127})", image)
        assert match, f"{name}: image {image!r} has no explicit tag"
        assert match.group(1) != "latest", f"{name}: image {image!r} floats on latest"


def test_entry_points_exist(any_compose: ComposeFile) -> None:
    for name, service in services(any_compose.doc).items():
        command = service.get("command")
        if isinstance(command, list) and command[:2] == ["python", "-m"]:
            module = command[2]
            assert importlib.util.find_spec(f"{module}.__main__"), f"{name}: no {module}.__main__"


def test_imgsearch_services_are_configured_with_real_settings(any_compose: ComposeFile,
                                                              tmp_path: Path) -> None:
    """Every variable given to our containers is a Settings field, and together they load."""
    from shared.config import Settings, load_settings

    fields = {name.upper() for name in Settings.model_fields}
    for name, service in services(any_compose.doc).items():
        if not service["image"].startswith(OUR_IMAGES):
            continue
        env = env_of(service)
        unknown = set(env) - fields
        assert not unknown, f"{name}: {sorted(unknown)} are not settings (typo?)"
        values = {k.lower(): v for k, v in env.items() if v is not None}
        # The container's /images mount does not exist here; any folder proves the rest.
        values["image_file_roots"] = str(tmp_path)
        settings = load_settings(**values)
        assert settings.qdrant_url, f"{name}: the compose stack must use the Qdrant server"


def test_named_volumes_are_declared_and_used(any_compose: ComposeFile) -> None:
    compose = any_compose.doc
    declared = set(compose.get("volumes") or {})
    used = set()
    for name, service in services(compose).items():
        for mount in service.get("volumes", []):
            source = mount.split(":")[0] if isinstance(mount, str) else mount.get("source", "")
            if source and not source.startswith((".", "/", "~", "$")):
                used.add(source)
                assert source in declared, f"{name} mounts undeclared volume {source!r}"
    assert declared == used, f"declared but unused: {sorted(declared - used)}"


def test_bind_mounted_files_exist(any_compose: ComposeFile) -> None:
    for name, service in services(any_compose.doc).items():
        for mount in service.get("volumes", []):
            source = mount.split(":")[0]
            if source.startswith("."):
                assert (any_compose.base / source).exists(), f"{name}: {source} does not exist"


def mounted(service: dict[str, Any], container_path: str, base: Path = COMPOSE.parent) -> Path:
    """The repository file behind a path inside a container, via its bind mounts."""
    for mount in service.get("volumes", []):
        source, target = mount.split(":")[:2]
        if source.startswith(".") and (container_path == target
                                       or container_path.startswith(target.rstrip("/") + "/")):
            return base / source / os.path.relpath(container_path, target)
    raise AssertionError(f"{container_path} is not bind-mounted from the repository")


def flag(service: dict[str, Any], name: str) -> str:
    for arg in service.get("command", []):
        if arg.startswith(f"--{name}="):
            return arg.split("=", 1)[1]
    raise AssertionError(f"no --{name} in {service.get('command')}")


def test_prometheus_alertmanager_and_grafana_read_the_shipped_files(
    compose: dict[str, Any],
) -> None:
    s = services(compose)
    prom_config = mounted(s["prometheus"], flag(s["prometheus"], "config.file"))
    assert prom_config.resolve() == PROMETHEUS_CONFIG.resolve()
    container_config = Path(flag(s["prometheus"], "config.file"))
    for rule_file in yaml.safe_load(PROMETHEUS_CONFIG.read_text())["rule_files"]:
        in_container = container_config.parent / rule_file  # relative to the config file
        assert mounted(s["prometheus"], str(in_container)).is_file(), rule_file
    am_config = mounted(s["alertmanager"], flag(s["alertmanager"], "config.file"))
    assert am_config.resolve() == ALERTMANAGER_CONFIG.resolve()

    grafana = s["grafana"]
    provisioning = mounted(grafana, "/etc/grafana/provisioning")
    assert provisioning.resolve() == (GRAFANA / "provisioning").resolve()
    providers = yaml.safe_load((provisioning / "dashboards" / "imgsearch.yml").read_text())
    for provider in providers["providers"]:
        folder = mounted(grafana, provider["options"]["path"])
        assert folder.resolve() == DASHBOARDS.resolve() and list(folder.glob("*.json"))
    home = env_of(grafana)["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert mounted(grafana, home).is_file()


def test_ports_and_addresses_agree(compose: dict[str, Any]) -> None:
    s = services(compose)
    prom = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    jobs = {j["job_name"]: j for j in prom["scrape_configs"]}

    def sd_port(job: str) -> int:
        return int(jobs[job]["dns_sd_configs"][0]["port"])

    aliases = {a for svc in s.values()
               for net in (svc.get("networks") or {}).values() if isinstance(net, dict)
               for a in net.get("aliases", [])}
    for job in jobs.values():
        for sd in job.get("dns_sd_configs", []):
            for dns_name in sd["names"]:
                assert dns_name in s or dns_name in aliases, f"{job['job_name']}: {dns_name}?"

    # Query API: listens on API_PORT, published, scraped and health-checked there.
    api = s["query-api"]
    api_port = int(env_of(api)["API_PORT"])
    assert api_port in container_ports(api)
    assert sd_port("query-api") == api_port
    assert f"127.0.0.1:{api_port}/readyz" in healthcheck_text(api)

    # Workers: metrics on WORKER_METRICS_PORT, scraped there; health-checked on the same
    # port's /readyz, which turns red when a worker thread has failed or stalled.
    for name in ("ingest-worker", "ingest-worker-gpu"):
        worker = s[name]
        port = int(env_of(worker)["WORKER_METRICS_PORT"])
        assert sd_port("ingest-worker") == port
        assert f"127.0.0.1:{port}/readyz" in healthcheck_text(worker)
        assert name == "ingest-worker" or "ingest-worker" in aliases

    # Qdrant and Kafka, as the services address them.
    for name in ("ingest-worker", "query-api"):
        host, port = url_port(env_of(s[name])["QDRANT_URL"])
        assert host == "qdrant" and port in container_ports(s["qdrant"])
        assert f"127.0.0.1/{port}" in healthcheck_text(s["qdrant"])
        assert env_of(s[name])["KAFKA_BOOTSTRAP_SERVERS"] == "kafka:9092"
    kafka = env_of(s["kafka"])
    listeners = dict(re.findall(r"(\w+)://[^:,]*:(\d+)", kafka["KAFKA_LISTENERS"]))
    advertised = dict(re.findall(r"(\w+)://([^,]+)", kafka["KAFKA_ADVERTISED_LISTENERS"]))
    assert advertised["PLAINTEXT"] == "kafka:9092" and listeners["PLAINTEXT"] == "9092"
    host_port = container_ports(s["kafka"])[int(listeners["HOST"])]
    assert advertised["HOST"] == f"localhost:{host_port}"
    assert "localhost:9092" in healthcheck_text(s["kafka"])
    assert "kafka:9092" in "\n".join(s["kafka-init"]["command"])

    # Prometheus -> Alertmanager, Grafana -> Prometheus.
    am_host, am_port = prom["alerting"]["alertmanagers"][0]["static_configs"][0]["targets"][0].split(":")
    assert am_host in s and int(am_port) in container_ports(s[am_host])
    datasources = yaml.safe_load(
        (GRAFANA / "provisioning" / "datasources" / "prometheus.yml").read_text())["datasources"]
    host, port = url_port(datasources[0]["url"])
    assert host in s and port in container_ports(s[host])

    # No two services publish the same host port.
    published = [(svc.get("ports") or []) for svc in s.values()]
    host_ports = [str(p).rsplit(":", 1)[0] for ports in published for p in ports]
    assert len(host_ports) == len(set(host_ports)), host_ports


def test_dependencies_can_be_met(any_compose: ComposeFile) -> None:
    s = services(any_compose.doc)
    for name, service in s.items():
        for dep, spec in (service.get("depends_on") or {}).items():
            assert dep in s, f"{name} depends on unknown {dep}"
            condition = spec["condition"]
            if condition == "service_healthy":
                assert "healthcheck" in s[dep], f"{name} waits for {dep} to be healthy: no check"
            if condition == "service_completed_successfully":
                assert s[dep].get("restart") == "no", f"{dep} must run once and exit"
    long_running = [n for n, svc in s.items() if svc.get("restart") != "no"]
    for name in long_running:
        if name != "dcgm-exporter":  # NVIDIA's image; Prometheus' TargetDown watches it
            assert "healthcheck" in s[name], f"{name} has no health check"


def test_kafka_init_creates_the_topics_the_services_use(compose: dict[str, Any]) -> None:
    s = services(compose)
    init_env = env_of(s["kafka-init"])
    script = "\n".join(s["kafka-init"]["command"])
    assert '--topic "$KAFKA_TOPIC"' in script and '--topic "$KAFKA_DLQ_TOPIC"' in script
    assert "--if-not-exists" in script
    for name in ("ingest-worker", "ingest-worker-gpu", "query-api"):
        env = env_of(s[name])
        assert env["KAFKA_TOPIC"] == init_env["KAFKA_TOPIC"]
        assert env["KAFKA_DLQ_TOPIC"] == init_env["KAFKA_DLQ_TOPIC"]
    assert env_of(s["kafka"])["KAFKA_AUTO_CREATE_TOPICS_ENABLE"] == "false"


# -- Dockerfiles ----------------------------------------------------------------------------------------


def dockerignore() -> list[str]:
    lines = (REPO / ".dockerignore").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def ignored(path: str, patterns: list[str]) -> bool:
    for pattern in patterns:
        pattern = pattern.lstrip("/")
        if pattern.startswith("**/"):
            if any(fnmatch.fnmatch(part, pattern[3:]) for part in path.split("/")):
                return True
        elif fnmatch.fnmatch(path, pattern) or path.startswith(pattern.rstrip("/") + "/"):
            return True
    return False


def test_dockerfiles_build_from_files_that_exist(any_compose: ComposeFile) -> None:
    patterns = dockerignore()
    built = [(n, svc["build"]) for n, svc in services(any_compose.doc).items() if "build" in svc]
    assert {b["dockerfile"] for _, b in built} <= {"deploy/docker/Dockerfile",
                                                  "deploy/docker/Dockerfile.cuda"}
    assert built, "nothing is built from this repository"
    for name, build in built:
        context = (any_compose.base / build["context"]).resolve()
        assert context == REPO.resolve(), f"{name}: build context {context} is not the repo"
        dockerfile = context / build["dockerfile"]
        assert dockerfile.is_file(), f"{name}: {dockerfile} is missing"
        text = dockerfile.read_text()
        base = re.search(r"^FROM\s+(\S+)", text, re.M)
        assert base and re.search(r":[\w.\-]+$", base.group(1)), f"{dockerfile}: unpinned base"
        assert base.group(1).split(":")[1] != "latest"
        for line in re.findall(r"^COPY\s+(?!--from)(.+)$", text, re.M):
            sources = shlex.split(line)[:-1]
            for source in sources:
                path = (context / source).resolve()
                rel = str(path.relative_to(context.resolve()))
                assert path.exists(), f"{dockerfile.name}: COPY {source}: no such file"
                assert not ignored(rel, patterns), f"{dockerfile.name}: .dockerignore drops {rel}"
        # Everything the package needs to install is copied.
        for package in ("shared", "ingest_worker", "query_api", "imgsearch"):
            assert f"COPY {package} ./{package}" in text, f"{dockerfile.name} misses {package}"


def test_dockerignore_keeps_secrets_and_data_out() -> None:
    patterns = dockerignore()
    for path in (".git/config", ".venv/bin/python", "data/store/x", ".env",
                 "deploy/weights/model.safetensors", "deploy/images/a.jpg",
                 "shared/__pycache__/x.pyc"):
        assert ignored(path, patterns), f"{path} would be sent to the Docker daemon"


# -- Grafana provisioning -----------------------------------------------------------------------------


def test_dashboards_use_the_provisioned_datasource() -> None:
    datasources = yaml.safe_load(
        (GRAFANA / "provisioning" / "datasources" / "prometheus.yml").read_text())["datasources"]
    uids = {d["uid"] for d in datasources}
    for path in DASHBOARDS.glob("*.json"):
        dashboard = json.loads(path.read_text())
        ids = [p["id"] for p in dashboard["panels"]] + [
            p["id"] for row in dashboard["panels"] for p in row.get("panels", [])]
        assert len(ids) == len(set(ids)), f"{path.name}: duplicate panel ids"
        titles = {p.get("title") for p in dashboard["panels"] if p.get("type") == "row"}
        assert {"Ingest", "Query", "Resources"} <= titles
        for panel in panels(dashboard):
            grid = panel["gridPos"]
            assert grid["x"] + grid["w"] <= 24, f"{path.name}: {panel['title']} overflows"
            assert panel["targets"], f"{path.name}: {panel['title']} has no query"
            for target in panel["targets"]:
                assert target["datasource"]["uid"] in uids, (path.name, panel["title"])
                assert target["expr"].strip(), (path.name, panel["title"])


# -- docs ------------------------------------------------------------------------------------------------

_COMPOSE_CMD = re.compile(r"^\s*(?:\w+=\S+\s+)*docker compose\s+(.*)$", re.M)
_ONE_SERVICE = {"exec", "run"}
_SERVICES_AFTER = {"up", "logs", "ps", "restart", "stop", "start", "build", "pull", "top", "rm",
                   "create", "kill", "pause", "unpause"}
_OPTIONS_WITH_VALUE = {"--scale", "--profile", "-f", "--file", "--index", "-e", "--env", "-u",
                       "--user", "-w", "--workdir", "--entrypoint", "--name", "-v", "--volume",
                       "--timeout", "-t", "--tail", "--wait-timeout", "-p", "--project-name"}


def test_operations_doc_commands_name_real_services_and_profiles(compose: dict[str, Any]) -> None:
    text = OPERATIONS.read_text() + (REPO / "docs" / "scaling.md").read_text()
    # A trailing backslash continues the command on the next line: its first line is enough.
    commands = [c.split("#")[0].rstrip().removesuffix("\\") for c in _COMPOSE_CMD.findall(text)]
    assert len(commands) >= 8, "docs/operations.md should show how to run the stack"
    for command in commands:
        tokens = shlex.split(command)
        # `-f FILE` picks the compose file the command runs against (the cluster's).
        files, i = [], 0
        while i < len(tokens) and tokens[i].startswith("-"):  # global options only
            if tokens[i] in ("-f", "--file"):
                files.append(tokens[i + 1])
            i += 2 if tokens[i] in _OPTIONS_WITH_VALUE else 1
        assert all((REPO / f).is_file() for f in files), f"`docker compose {command}`: {files}"
        s = services(ComposeFile(REPO / files[0]).doc if files else compose)
        profiles = {p for svc in s.values() for p in svc.get("profiles", [])}
        for scaled in re.findall(r"--scale[= ](\S+)=\d+", command):
            assert scaled in s, f"`docker compose {command}`: no service {scaled}"
        i, sub = 0, None
        while i < len(tokens):
            token = tokens[i]
            if token == "--profile":
                assert tokens[i + 1] in profiles, f"{command}: no profile {tokens[i + 1]}"
            if token in _OPTIONS_WITH_VALUE:
                i += 2
                continue
            if token.startswith("-"):
                i += 1
                continue
            if sub is None:
                sub = token
            elif sub in _SERVICES_AFTER:
                assert token in s, f"`docker compose {command}`: {token!r} is not a service"
            elif sub in _ONE_SERVICE:
                assert token in s, f"`docker compose {command}`: {token!r} is not a service"
                break
            i += 1


def test_operations_doc_says_the_stack_is_not_started_in_ci() -> None:
    text = OPERATIONS.read_text()
    assert "Docker" in text and re.search(r"not (started|run)[^.]*(CI|tests)", text)


# -- the cluster topology (deploy/compose-cluster.yml) ---------------------------------------------


def named(s: dict[str, dict[str, Any]], prefix: str) -> dict[str, dict[str, Any]]:
    return {n: svc for n, svc in s.items() if re.fullmatch(rf"{prefix}-\d+", n)}


def test_cluster_kafka_is_three_kraft_brokers_that_keep_two_copies(cluster: dict[str, Any]) -> None:
    s = services(cluster)
    brokers = named(s, "kafka")
    assert len(brokers) == 3
    voters = set()
    for name, broker in brokers.items():
        env = env_of(broker)
        assert env["KAFKA_PROCESS_ROLES"] == "broker,controller"
        voters.add(env["KAFKA_CONTROLLER_QUORUM_VOTERS"])
        advertised = dict(re.findall(r"(\w+)://([^,]+)", env["KAFKA_ADVERTISED_LISTENERS"]))
        assert advertised["PLAINTEXT"] == f"{name}:9092"
        assert int(env["KAFKA_DEFAULT_REPLICATION_FACTOR"]) == 3
        assert int(env["KAFKA_MIN_INSYNC_REPLICAS"]) == 2
        assert int(env["KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR"]) == 3
        assert int(env["KAFKA_TRANSACTION_STATE_LOG_MIN_ISR"]) == 2
        assert env["KAFKA_UNCLEAN_LEADER_ELECTION_ENABLE"] == "false"
        assert env["KAFKA_AUTO_CREATE_TOPICS_ENABLE"] == "false"
    # One quorum naming every broker by its own node id.
    assert len(voters) == 1
    quorum = dict(v.split("@") for v in voters.pop().split(","))
    assert {quorum[str(env_of(b)["KAFKA_NODE_ID"])].split(":")[0] for b in brokers.values()} \
        == set(brokers)
    script = "\n".join(s["kafka-init"]["command"])
    assert script.count("--replication-factor 3") == 2
    assert script.count("min.insync.replicas=2") == 2
    # Clients know every broker, so losing the one they bootstrapped from does not matter.
    for name in ("ingest-worker", "query-api"):
        servers = env_of(s[name])["KAFKA_BOOTSTRAP_SERVERS"].split(",")
        assert servers == [f"{b}:9092" for b in sorted(brokers)]


def test_cluster_qdrant_is_three_nodes_behind_one_name(cluster: dict[str, Any],
                                                       tmp_path: Path) -> None:
    from shared.config import load_settings

    s = services(cluster)
    nodes = named(s, "qdrant")
    assert len(nodes) == 3
    bootstrap = {env_of(n)["QDRANT_BOOTSTRAP"] for n in nodes.values()}
    assert len(bootstrap) == 1
    first = [name for name, n in nodes.items() if env_of(n)["QDRANT_URI"] in bootstrap]
    assert len(first) == 1, "exactly one node starts the cluster (its URI is the bootstrap)"
    for name, node in nodes.items():
        env = env_of(node)
        assert env["QDRANT__CLUSTER__ENABLED"] == "true"
        assert env["QDRANT_URI"] == f"http://{name}:{env['QDRANT__CLUSTER__P2P__PORT']}"
        assert node["networks"]["default"]["aliases"] == ["qdrant"]
        if name not in first:
            assert node["depends_on"][first[0]]["condition"] == "service_healthy"
    for name in ("ingest-worker", "query-api"):
        env = env_of(s[name])
        host, port = url_port(env["QDRANT_URL"])
        assert host == "qdrant" and port == 6333
        for node in nodes:  # nobody starts before every node is ready
            assert s[name]["depends_on"][node]["condition"] == "service_healthy"
        values = {k.lower(): v for k, v in env.items() if v is not None}
        settings = load_settings(**{**values, "image_file_roots": str(tmp_path)})
        assert (settings.qdrant_shards, settings.qdrant_replication_factor) == (6, 2)
        assert settings.qdrant_write_consistency == 1
        assert settings.qdrant_write_ordering == "medium"


def test_cluster_probes_and_scrapes_point_at_real_endpoints(cluster: dict[str, Any]) -> None:
    s = services(cluster)
    worker = s["ingest-worker"]
    port = int(env_of(worker)["WORKER_METRICS_PORT"])
    assert f"127.0.0.1:{port}/readyz" in healthcheck_text(worker)
    api = s["query-api"]
    assert f"127.0.0.1:{env_of(api)['API_PORT']}/readyz" in healthcheck_text(api)
    # The shipped Prometheus, Alertmanager and Grafana files, mounted from deploy/.
    prom = s["prometheus"]
    assert mounted(prom, flag(prom, "config.file"), CLUSTER_COMPOSE.parent).resolve() \
        == PROMETHEUS_CONFIG.resolve()
    jobs = yaml.safe_load(PROMETHEUS_CONFIG.read_text())["scrape_configs"]
    for job in jobs:
        for sd in job.get("dns_sd_configs", []):
            for dns_name in sd["names"]:
                assert dns_name in s or dns_name == "dcgm-exporter", dns_name
    assert mounted(s["grafana"], "/etc/grafana/provisioning", CLUSTER_COMPOSE.parent).is_dir()
    published = [str(p).rsplit(":", 1)[0] for svc in s.values() for p in svc.get("ports", [])]
    assert len(published) == len(set(published)), published

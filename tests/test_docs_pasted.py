"""The docs, pasted as written: every command block of README.md and docs/*.md that can run
offline runs here, so a doc cannot drift from the product again.

A command is one of:

* **stack**: the README's `imgsearch up`, started once; the other commands run beside it;
* **run**: run by bash (or python, for a ```python block) as written, after the few
  substitutions below, against that stack; it must exit 0 and pass its check;
* **server**: `python -m query_api`, started in the background until /readyz answers;
* **parse**: another `imgsearch up` (a second stack): its arguments are parsed by the real
  command line, which catches a renamed option or a missing path;
* **skip**: it cannot run offline here; SKIPS says why.

The machine is offline, as a reader without internet is: every command runs with
MODEL_NAME/MODEL_WEIGHTS naming the real mobilenetv2_100 weights (the docs' documented
way to run without the hub) and HF_HUB_OFFLINE=1, HOME in a temporary folder holding
~/Pictures (a few species of the test birds and one broken file), and PATH starting with
the project's .venv/bin (as `. .venv/bin/activate` would). The table of what each
command became is printed, and kept in test-artifacts/docs-pasted.txt.
"""

from __future__ import annotations

import json
import os
import queue
import re
import shlex
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import ASSETS, REPO, TansuBroker, free_port

DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(bash|sh|python)\n(.*?)^```", re.MULTILINE | re.DOTALL)
ARTIFACTS = REPO / "test-artifacts"
COMMAND_TIMEOUT_S = 180
STACK_START_S = 240.0

# The one `up` the test starts: the README's quickstart, as a new user pastes it.
STACK = ".venv/bin/imgsearch up ~/Pictures"
# The docs' placeholders, and what the test puts in their place. Nothing else changes.
SUBSTITUTIONS: tuple[tuple[str, str, str], ...] = (
    ("/path/to/mobilenetv2_100.safetensors", "{weights}",
     "the docs' placeholder for a weights file"),
    ("localhost:8000", "127.0.0.1:{port}", "the API runs on a free port (8000 may be taken)"),
    ("127.0.0.1:8000", "127.0.0.1:{port}", "the same"),
    ('"localhost:9092"', '"{bootstrap}"',
     "the README's producer: up's broker listens on a random port (its 'broker:' line)"),
    ("/srv/photos/", "{home}/Pictures/birds/",
     "the README's producer: a file:// URI must be under a folder up serves"),
)
APPENDED = {STACK: " --port {port}", "python -m query_api": " --port {port}"}
# (pattern, why it cannot run here). First match wins.
SKIPS: tuple[tuple[str, str], ...] = (
    (r"\bdocker\b", ("needs Docker, which CI has not; tests/test_deploy_files.py checks the "
                     "compose files")),
    (r"\bpip install\b|python3 -m venv", ("installs from the network; the test runs in the "
                                          "project's .venv")),
    (r"^bash scripts/test\.sh$", "the whole test suite, with apt-get"),
    (r"\b(kubectl|helm)\b", ("needs a Kubernetes cluster; tests/test_k8s.py renders and "
                             "checks deploy/k8s offline")),
    (r"\bimgsearch demo\b", "downloads 1,000 photos from GitHub"),
    (r"bench/detector\.py", "a benchmark: minutes on 2 cores"),
    (r"localhost:9094", "the compose stack's Kafka"),
)
# Commands that need the store `up` holds: run once it has stopped.
AFTER_STACK = re.compile(r"\bimgsearch index\b")
OWN_STACK_DOCS = ("query_api.md",)  # a stack of their own: index, then python -m query_api


@dataclass
class Command:
    doc: str
    line: int
    lang: str
    text: str
    kind: str = "run"
    why: str = ""
    ran_as: str = ""
    outcome: str = ""


def _lines(body: str) -> Iterator[str]:
    """A shell block's commands: continuation lines joined, blanks and comments dropped."""
    joined = re.sub(r"\\\n\s*", " ", body)
    for line in joined.splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            yield line.strip()


def read_commands() -> list[Command]:
    found = []
    for doc in DOCS:
        text = doc.read_text()
        for match in FENCE.finditer(text):
            line = text[: match.start()].count("\n") + 1
            lang, body = match.group(1), match.group(2)
            name = doc.relative_to(REPO).as_posix()
            if lang == "python":
                found.append(Command(name, line, "python", body))
            else:
                found.extend(Command(name, line, "sh", c) for c in _lines(body))
    return found


def classify(cmd: Command) -> Command:
    for pattern, why in SKIPS:
        if re.search(pattern, cmd.text):
            cmd.kind, cmd.why = "skip", why
            return cmd
    if cmd.lang == "python" and "yolov5" in cmd.text:
        import importlib.util

        if importlib.util.find_spec("yolov5") is None:
            cmd.kind, cmd.why = "skip", "needs the optional YOLOv5 install (docs/detection.md)"
            return cmd
    if cmd.text.split(" #")[0].strip() == STACK:
        cmd.kind, cmd.why = "stack", "the stack the other commands run against"
    elif re.search(r"\bimgsearch up\b", cmd.text):
        cmd.kind, cmd.why = "parse", "a second stack: its arguments are checked, not run"
    elif cmd.text.startswith("python -m query_api"):
        cmd.kind, cmd.why = "server", "started in the background until /readyz answers"
    return cmd


def test_every_block_is_classified() -> None:
    commands = [classify(c) for c in read_commands()]
    assert sum(c.kind == "stack" for c in commands) == 1, (
        f"the README's quickstart command {STACK!r} is gone: update STACK")
    assert {c.kind for c in commands} <= {"stack", "run", "server", "parse", "skip"}
    runnable = [c for c in commands if c.kind != "skip"]
    assert len(runnable) >= 20, "the docs' commands are mostly runnable: keep them so"


# -- the world the docs assume ------------------------------------------------------------------


@dataclass
class World:
    root: Path
    home: Path
    work: Path  # "a clone of this repository": where commands run
    env: dict[str, str]
    weights: Path
    values: dict[str, Any] = field(default_factory=dict)

    def substitute(self, cmd: Command) -> str:
        text = cmd.text
        for stub, value, _why in SUBSTITUTIONS:
            if stub in text:
                text = text.replace(stub, value.format(**self.values))
        for stub, extra in APPENDED.items():
            if cmd.text.split(" #")[0].strip() == stub:
                text = text.split(" #")[0].rstrip() + extra.format(**self.values)
        return text


def _copy_photos(birds: Path, into: Path, species: tuple[str, ...], n: int) -> None:
    for name in species:
        (into / name).mkdir(parents=True, exist_ok=True)
        for photo in sorted((birds / name).glob("*.jpg"))[:n]:
            shutil.copy(photo, into / name / photo.name)


def make_world(root: Path, birds: Path, weights: Path) -> World:
    home, work = root / "home", root / "repo"
    work.mkdir(parents=True)
    _copy_photos(birds, home / "Pictures" / "birds",
                 ("Blue_Jay", "Horned_Puffin", "Green_Kingfisher"), 10)
    (home / "Pictures" / "birds" / "Green_Kingfisher" / "broken.jpg").write_bytes(b"not a photo at all")
    shutil.copy(birds / "Blue_Jay" / "0031.jpg", home / "Pictures" / "birds" / "cat-1.jpg")
    # What a clone holds that the commands use, and the files the docs name.
    for name in (".venv", "bench"):
        (work / name).symlink_to(REPO / name)
    shutil.copy(birds / "Blue_Jay" / "0030.jpg", work / "photo.jpg")
    _copy_photos(birds, work / "more-photos", ("Cactus_Wren",), 3)
    _copy_photos(birds, work / "photos", ("Gray_Catbird",), 5)
    (work / "mobilenetv2_100.safetensors").symlink_to(weights)
    if (ASSETS / "weights" / "yolov5n.pt").exists():
        shutil.copy(ASSETS / "weights" / "yolov5n.pt", work / "yolov5n.pt")
    # docs/query_api.md: "with the test assets in ../shared" (a few species of them).
    shared = root / "shared"
    (shared / "weights").mkdir(parents=True)
    (shared / "weights" / "mobilenetv2_100.safetensors").symlink_to(weights)
    _copy_photos(birds, shared / "data" / "birds", ("American_Goldfinch", "Blue_Jay"), 6)
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("KAFKA_", "QDRANT_", "MODEL_", "API_", "HF_", "IMGSEARCH_"))
           and k not in ("IMAGE_FILE_ROOTS", "LOG_LEVEL", "VIRTUAL_ENV", "PYTHONPATH")}
    env.update(HOME=str(home), PATH=f"{REPO / '.venv' / 'bin'}:{env.get('PATH', '')}",
               MODEL_NAME="mobilenetv2_100", MODEL_WEIGHTS=str(weights), HF_HUB_OFFLINE="1",
               HF_HOME=str(root / "hf"), TORCH_HOME=str(root / "torch"),
               PYTHONUNBUFFERED="1")
    return World(root, home, work, env, weights,
                 {"weights": str(weights), "home": str(home), "port": free_port()})


# -- running ----------------------------------------------------------------------------------


class Background:
    """A long-running command (the stack, a server); its output lines are collected."""

    def __init__(self, text: str, world: World, log: Path) -> None:
        self.lines: list[str] = []
        self._new: queue.Queue[str] = queue.Queue()
        self.log = log
        self.process = subprocess.Popen(["bash", "-c", f"exec {text}"], cwd=world.work,
                                        env=world.env, stdout=subprocess.PIPE,
                                        stderr=subprocess.STDOUT, text=True, errors="replace")
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        with self.log.open("a") as log:
            for line in self.process.stdout:
                log.write(line)
                for part in line.rstrip("\n").split("\r"):
                    self.lines.append(part)
                    self._new.put(part)

    def wait_for(self, pattern: str, timeout_s: float) -> re.Match[str]:
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout_s
        for line in list(self.lines):
            if m := regex.search(line):
                return m
        while time.monotonic() < deadline:
            try:
                line = self._new.get(timeout=0.5)
            except queue.Empty:
                if self.process.poll() is not None:
                    break
                continue
            if m := regex.search(line):
                return m
        raise AssertionError(f"no {pattern!r} within {timeout_s}s; output:\n"
                             + "\n".join(self.lines[-60:]))

    def stop(self, sig: signal.Signals = signal.SIGINT, timeout_s: float = 90) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._reader.join(10)
        if self.process.stdout is not None:
            self.process.stdout.close()
        return int(self.process.returncode)


def run(cmd: Command, world: World) -> subprocess.CompletedProcess[str]:
    text = world.substitute(cmd)
    cmd.ran_as = text
    if cmd.lang == "python":
        script = world.work / f"block-{Path(cmd.doc).stem}-{cmd.line}.py"
        script.write_text(text)
        argv = ["python", script.name]
    else:
        argv = ["bash", "-o", "pipefail", "-c", text]
    result = subprocess.run(argv, cwd=world.work, env=world.env, capture_output=True,
                            text=True, timeout=COMMAND_TIMEOUT_S, check=False)
    cmd.outcome = f"exit {result.returncode}"
    assert result.returncode == 0, (
        f"{cmd.doc}:{cmd.line} failed as pasted:\n$ {text}\n{result.stdout[-3000:]}\n"
        f"{result.stderr[-3000:]}")
    return result


def export(cmd: Command, world: World) -> None:
    """`export A=... B=...`: the variables stay for the doc's later commands."""
    text = world.substitute(cmd)
    cmd.ran_as, cmd.outcome = text, "exported"
    out = subprocess.run(["bash", "-c", f"{text} && env -0"], cwd=world.work, env=world.env,
                         capture_output=True, text=True, timeout=30, check=True).stdout
    world.env = dict(item.split("=", 1) for item in out.split("\0") if "=" in item)


def parse(cmd: Command, world: World) -> None:
    """Check a command's arguments with the real command line, without running it."""
    import click

    from imgsearch.cli import cli

    words = [w for w in shlex.split(world.substitute(cmd), comments=True)
             if not re.match(r"^[A-Z_]+=", w)]
    words = [str(world.home) + w[1:] if w.startswith("~") else w for w in words]
    assert words[0].endswith("imgsearch"), cmd.text
    ctx = click.Context(cli, info_name="imgsearch")
    sub = cli.get_command(ctx, words[1])
    assert sub is not None, f"{cmd.doc}:{cmd.line}: no command {words[1]!r}"
    cwd = Path.cwd()
    os.chdir(world.work)  # relative paths in the docs are relative to the clone
    try:
        with sub.make_context(words[1], words[2:], parent=ctx):
            pass
    finally:
        os.chdir(cwd)
    cmd.ran_as, cmd.outcome = " ".join(words), "arguments parse"


def api(world: World) -> httpx.Client:
    return httpx.Client(base_url=f"http://127.0.0.1:{world.values['port']}", timeout=60)


def wait_until(check: Any, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.5)
    raise AssertionError(f"{what} within {timeout_s}s")


def check(cmd: Command, result: subprocess.CompletedProcess[str], world: World,
          counted: int) -> None:
    """What a reader of the doc expects to see, beyond a zero exit status."""
    text = cmd.ran_as
    if text.startswith("curl -s ") and " -o " not in text:
        assert result.stdout.strip() and '"error"' not in result.stdout, (text, result.stdout)
    if " -o thumb.jpg" in text:
        assert (world.work / "thumb.jpg").read_bytes()[:2] == b"\xff\xd8"
    if cmd.lang == "python" and "KafkaProducer" in text:
        with api(world) as client:
            wait_until(lambda: client.get("/images/cat-1").status_code == 200, 90,
                       "the README producer's event was not searchable")
        cmd.outcome += "; cat-1 searchable"
    if text.startswith("imgsearch dlq list"):
        assert "undecodable" in result.stdout, result.stdout + result.stderr
    if text.startswith("imgsearch search"):
        assert json.loads(result.stdout)["hits"], result.stdout
    if text.startswith("imgsearch publish"):
        with api(world) as client:
            wait_until(lambda: client.get("/count").json()["count"] >= counted + 3, 90,
                       "the published photos were not stored")
        cmd.outcome += "; 3 more images stored"


def report(commands: list[Command]) -> str:
    rows = [f"{c.doc}:{c.line}  [{c.kind}]  {c.text[:110]!r}"
            + (f"\n      ran as: {c.ran_as[:150]!r}" if c.ran_as and c.ran_as != c.text else "")
            + (f"\n      -> {c.outcome}" if c.outcome else "")
            + (f"\n      ({c.why})" if c.why and c.kind != "run" else "")
            for c in commands]
    subs = [f"  {stub!r} -> {value!r}: {why}" for stub, value, why in SUBSTITUTIONS]
    return ("substitutions:\n" + "\n".join(subs) + f"\n  appended: {APPENDED}\n\n"
            + "\n".join(rows))


@pytest.mark.slow
def test_the_docs_run_as_written(tmp_path: Path, birds: Path, mobilenet_weights: Path,
                                 broker: TansuBroker) -> None:
    commands = [classify(c) for c in read_commands()]
    world = make_world(tmp_path, birds, mobilenet_weights)
    ARTIFACTS.mkdir(exist_ok=True)
    started = time.monotonic()
    try:
        _stack_phase(commands, world)
        _own_stack_phase(commands, world, tmp_path, broker)
    finally:
        table = report(commands)
        (ARTIFACTS / "docs-pasted.txt").write_text(table + "\n")
        print("\n" + table)
        print(f"\ndocs pasted in {time.monotonic() - started:.0f}s")
    assert all(c.outcome for c in commands if c.kind != "skip"), [
        f"{c.doc}:{c.line}" for c in commands if c.kind != "skip" and not c.outcome]


def _stack_phase(commands: list[Command], world: World) -> None:
    mine = [c for c in commands if not c.doc.endswith(OWN_STACK_DOCS)]
    stack_cmd = next(c for c in mine if c.kind == "stack")
    up = Background(world.substitute(stack_cmd), world, world.root / "up.log")
    stack_cmd.ran_as = world.substitute(stack_cmd)
    try:
        up.wait_for(r"^ready: ", STACK_START_S)
        running = json.loads((world.work / "data" / "imgsearch-up" / "running.json").read_text())
        world.values["bootstrap"] = running["bootstrap"]
        stack_cmd.outcome = "ready: " + up.wait_for(r"^ready:\s+(.*)", 1).group(1)
        for cmd in mine:
            if cmd.kind == "parse":
                parse(cmd, world)
            elif cmd.kind == "run" and not AFTER_STACK.search(cmd.text):
                with api(world) as client:
                    counted = client.get("/count").json()["count"]
                result = run(cmd, world)
                check(cmd, result, world, counted)
    finally:
        code = up.stop()
    assert code == 0 and "stopped cleanly" in "\n".join(up.lines), "\n".join(up.lines[-40:])
    # Then what needs the store to itself (quickstart: "stop `up` before indexing").
    for cmd in mine:
        if cmd.kind == "run" and AFTER_STACK.search(cmd.text):
            run(cmd, world)


def _own_stack_phase(commands: list[Command], world: World, root: Path,
                     broker: TansuBroker) -> None:
    """docs/query_api.md: index ../shared/data/birds, serve it, then the curl examples. Its
    uploads need a broker, as the doc says: the test's."""
    from shared.config import load_settings
    from shared.kafka import ensure_topics

    mine = [c for c in commands if c.doc.endswith(OWN_STACK_DOCS)]
    world.env["KAFKA_BOOTSTRAP_SERVERS"] = broker.bootstrap
    settings = load_settings(kafka_bootstrap_servers=broker.bootstrap)
    ensure_topics(settings, [settings.kafka_topic])  # production creates its topics itself
    world.values["port"] = free_port()
    server: Background | None = None
    try:
        for cmd in mine:
            if cmd.text.startswith("export "):
                export(cmd, world)
            elif cmd.kind == "server":
                text = world.substitute(cmd)
                cmd.ran_as = text
                server = Background(text, world, root / "query_api.log")
                with api(world) as client:
                    wait_until(lambda c=client: _ready(c), 180, "python -m query_api not ready")
                cmd.outcome = "/readyz 200"
            elif cmd.kind == "run":
                result = run(cmd, world)
                check(cmd, result, world, 0)
    finally:
        if server is not None:
            server.stop(signal.SIGTERM)


def _ready(client: httpx.Client) -> bool:
    try:
        return client.get("/readyz").status_code == 200
    except httpx.HTTPError:
        return False

"""Where a running ``imgsearch up`` is: its broker, topics and search page.

``up`` writes ``<data dir>/imgsearch-up/running.json`` once it serves, and removes it when it stops.
The other commands (``dlq``, ``publish``, ``search``, ``index``) read it from the same data
directory (``--data-dir``, QDRANT_PATH, or ./data), so beside a running ``up`` they reach
its broker, whose port is random, without anyone copying an address. A file left by a
process that died is ignored (its pid is gone).

Explicit settings win: with KAFKA_BOOTSTRAP_SERVERS set in the environment, the commands
use that Kafka and ignore the file.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from shared.config import Settings

STATE_DIR = "imgsearch-up"
RUNNING_FILE = "running.json"


@dataclass(frozen=True)
class RunningStack:
    pid: int
    api_url: str  # the search page and API, e.g. http://127.0.0.1:8000
    bootstrap: str  # the broker, e.g. 127.0.0.1:54865
    topic: str
    dlq_topic: str
    group: str
    collection: str
    data_dir: str
    file_roots: list[str] = field(default_factory=list)  # folders the workers may read
    local_broker: bool = True
    started_at: str = ""

    def settings_overrides(self) -> dict[str, Any]:
        """The Settings fields that reach this stack's broker and topics."""
        return {"kafka_bootstrap_servers": self.bootstrap, "kafka_topic": self.topic,
                "kafka_dlq_topic": self.dlq_topic}

    def describe(self) -> str:
        return f"`imgsearch up` (pid {self.pid}, {self.api_url}/, broker {self.bootstrap})"


def state_dir(data_dir: Path) -> Path:
    return Path(data_dir) / STATE_DIR


def running_file(data_dir: Path) -> Path:
    return state_dir(data_dir) / RUNNING_FILE


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process: alive, and not ours to judge
    # A zombie has exited: it serves nothing.
    try:
        return "\nState:\tZ" not in Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return True


def record(stack: RunningStack) -> Path:
    """Write ``stack`` into its data directory, atomically."""
    path = running_file(Path(stack.data_dir))
    path.parent.mkdir(parents=True, exist_ok=True)
    body = asdict(stack)
    body["started_at"] = body["started_at"] or datetime.now(UTC).isoformat()
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(body, indent=2) + "\n")
    tmp.replace(path)
    return path


def clear(data_dir: Path, pid: int | None = None) -> None:
    """Remove the record, if it is ``pid``'s (default: this process's)."""
    path = running_file(data_dir)
    found = _read(path)
    if found is not None and found.pid == (pid or os.getpid()):
        path.unlink(missing_ok=True)


def _read(path: Path) -> RunningStack | None:
    try:
        body = json.loads(path.read_text())
        return RunningStack(**{k: v for k, v in body.items()
                               if k in RunningStack.__dataclass_fields__})
    except (OSError, ValueError, TypeError):
        return None


def find(data_dir: Path) -> RunningStack | None:
    """The ``up`` serving ``data_dir`` now, or None (no record, or its process is gone)."""
    found = _read(running_file(data_dir))
    if found is None or found.pid == os.getpid() or not pid_alive(found.pid):
        return None
    return found


def data_dir_of(settings: Settings, data_dir: Path | None = None) -> Path:
    """The data directory a command means: --data-dir, else QDRANT_PATH, else ./data."""
    return Path(data_dir).absolute() if data_dir is not None else settings.embedded_store_path


def explicit_broker() -> bool:
    return bool(os.environ.get("KAFKA_BOOTSTRAP_SERVERS"))


def broker_hint(data_dir: Path) -> str:
    """What to do when no broker answers: said in one line by every command."""
    return (f"Is `imgsearch up` running? It records its broker in {running_file(data_dir)}: "
            "run this command from the folder `up` was started in, or pass its --data-dir, "
            "or set KAFKA_BOOTSTRAP_SERVERS to the address its 'broker:' line shows.")

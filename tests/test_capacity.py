"""bench/capacity.py: it reproduces docs/scaling.md from the measured inputs, answers
other numbers the way the arithmetic says, and runs on a bare Python."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

sys.path.insert(0, str(REPO / "bench"))
import capacity

DOC = REPO / "docs" / "scaling.md"
# <!-- capacity: ARGS --> ... <!-- /capacity -->: a table the script printed for ARGS.
_BLOCK = re.compile(r"<!-- capacity: (.*?) -->\n(.*?)\n<!-- /capacity -->", re.DOTALL)


def run(*args: str) -> dict[str, str]:
    """The plan's rows as {what: value}."""
    target = capacity.parse(["--images", "50e6", "--uploads-per-s", "500", "--qps", "200",
                             "--p99-ms", "150", *args])
    plan = capacity.plan(capacity.Inputs.load(), target)
    return {what: value for what, value, _ in plan.lines}


def number(text: str) -> float:
    return float(re.match(r"[\d,.]+", text).group(0).replace(",", ""))  # type: ignore[union-attr]


def test_the_docs_tables_are_what_the_script_prints(capsys: pytest.CaptureFixture[str]) -> None:
    blocks = _BLOCK.findall(DOC.read_text())
    assert len(blocks) >= 2, "docs/scaling.md should show the script's answer for its examples"
    for args, table in blocks:
        printed = capacity.main(args.split())
        assert printed.strip() == table.strip(), (
            f"docs/scaling.md is stale for `python bench/capacity.py {args}`: rerun it and "
            "paste its output")
    capsys.readouterr()


def test_more_uploads_need_more_workers_then_more_partitions() -> None:
    rate = 40.0
    base = run("--worker-img-per-s", str(rate))
    # ceil(uploads / (rate x utilisation)): 500 / 28 -> 18 workers, more than 12 partitions.
    assert number(base["ingest workers"]) == 18
    assert base["topic partitions"] == "18 or more"
    assert number(run("--worker-img-per-s", str(rate), "--uploads-per-s", "100")
                  ["ingest workers"]) == 4
    # A faster engine (an ONNX or GPU figure) slots in as a number and shrinks the fleet.
    fast = run("--worker-img-per-s", "500")
    assert number(fast["ingest workers"]) == 2 and fast["topic partitions"] == "12"
    assert number(fast["KEDA lagThreshold"]) == 500 * 60


def test_memory_follows_the_vector_encoding_and_where_vectors_live() -> None:
    full = run("--variant", "full")
    small = run("--variant", "pca:320+int8")
    on_disk = run("--variant", "pca:320+int8", "--on-disk-vectors")
    ram = "RAM per point (one copy)"
    assert number(full[ram]) > number(small[ram]) > number(on_disk[ram])
    # Moving the float32 vectors to disk saves exactly their bytes.
    assert number(small[ram]) - number(on_disk[ram]) == pytest.approx(
        number(small["bytes per point: vectors (float32)"]), abs=1)
    assert number(full["Qdrant nodes"]) >= number(small["Qdrant nodes"]) >= 3
    # Twice the replicas, twice the memory for the same points.
    assert number(run("--replication", "4")["Qdrant RAM, all copies"]) == pytest.approx(
        2 * number(full["Qdrant RAM, all copies"]), rel=0.01)


def test_shards_are_a_multiple_of_the_nodes() -> None:
    for variant in ("full", "pca:320+int8"):
        plan = run("--variant", variant, "--node-memory-gib", "32")
        assert number(plan["QDRANT_SHARDS"]) % number(plan["Qdrant nodes"]) == 0


def test_a_tighter_p99_needs_more_replicas_or_says_it_cannot_be_met() -> None:
    # The API's p99 plus the search p99 at 3M points per shard (tens of ms) must fit.
    loose = run("--api-levels", "40:30,70:600", "--p99-ms", "2000")
    tight = run("--api-levels", "40:30,70:600", "--p99-ms", "300")
    assert number(loose["API QPS per replica within p99"]) == 70
    assert number(tight["API QPS per replica within p99"]) == 40
    assert number(loose["API replicas"]) == 5  # ceil(200 / (70 x 0.7))
    assert number(tight["API replicas"]) == 8  # ceil(200 / (40 x 0.7))
    impossible = run("--api-levels", "40:30,60:90", "--p99-ms", "20")
    assert impossible["API replicas"] == "target not reachable"


def test_the_script_needs_nothing_but_the_standard_library(tmp_path: Path) -> None:
    tree = ast.parse((REPO / "bench" / "capacity.py").read_text())
    imported = {alias.name.split(".")[0] for node in ast.walk(tree)
                if isinstance(node, ast.Import) for alias in node.names}
    imported |= {node.module.split(".")[0] for node in ast.walk(tree)
                 if isinstance(node, ast.ImportFrom) and node.module and node.level == 0}
    assert imported - {"__future__"} <= set(sys.stdlib_module_names), imported
    # And it runs so: isolated, without site-packages, from another directory.
    result = subprocess.run(
        [sys.executable, "-I", "-S", str(REPO / "bench" / "capacity.py"), "--images", "1e6",
         "--uploads-per-s", "10", "--qps", "5", "--p99-ms", "500"],
        capture_output=True, text=True, timeout=60, cwd=tmp_path, check=False)
    assert result.returncode == 0, result.stderr
    assert "| ingest workers |" in result.stdout

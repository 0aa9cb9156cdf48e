"""``imgsearch reindex``: change the model (or reduction, quantization) of a live index.

    imgsearch reindex start --model NAME [--weights FILE] [--variant pca:320+int8]
    imgsearch reindex status [--watch]
    imgsearch reindex swap [--eval DATASET --min-map X]
    imgsearch reindex rollback
    imgsearch reindex finish

Against a Qdrant server (QDRANT_URL) or an embedded store no process holds, the commands
work on the store directly; ``start`` runs the backfill in the foreground (Ctrl-C stops
it, ``start`` again resumes it). Beside a running ``imgsearch up``, they ask its API
(/admin/reindex), which runs the backfill in ``up``'s own process. docs/migration.md.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
import httpx

from imgsearch.cli import DATA_DIR_HELP, settings_or_exit
from shared.errors import ImgSearchError

DONE_STATES = ("ready", "failed", "swapped", "rolled_back", "finished", "stopped")


# -- where the commands go: a running `up`, or the store itself ---------------------------------


def _running_up(data_dir: Path | None) -> Any:
    from imgsearch.stack import data_dir_of, find

    settings = settings_or_exit()
    if settings.qdrant_url:
        return None
    return find(data_dir_of(settings, data_dir))


class UpClient:
    """The admin API of a running `imgsearch up`."""

    def __init__(self, found: Any) -> None:
        self.found = found
        key = os.environ.get("IMGSEARCH_API_KEY")
        self.base = f"{found.api_url}/admin/reindex"
        self.client = httpx.Client(timeout=600, headers={"X-API-Key": key} if key else {})

    def call(self, method: str, path: str = "", body: dict[str, Any] | None = None) -> Any:
        try:
            response = self.client.request(method, self.base + path, json=body)
        except httpx.HTTPError as exc:
            raise click.ClickException(f"{self.found.describe()} did not answer: {exc}") from exc
        if response.status_code == 404:
            raise click.ClickException(f"{self.found.describe()} has no /admin/reindex: it is "
                                       "older than this command; restart it")
        if response.status_code >= 400:
            try:
                error = response.json()["error"]
                text = f"{error['message']}"
            except (ValueError, KeyError, TypeError):
                text = response.text[:500]
            raise click.ClickException(text)
        return response.json()


def _local(data_dir: Path | None) -> Any:
    """A Reindex over the configured store, opened by this process."""
    from shared.reindex.controller import Reindex
    from shared.reindex.specs import SpecSet

    overrides: dict[str, Any] = {}
    if data_dir is not None:
        overrides["qdrant_path"] = data_dir
    settings = settings_or_exit(**overrides)
    specs = SpecSet(None, settings=settings, poll_s=0, preload=False)
    return Reindex(specs, say=lambda line: click.echo(line, err=True))


def _fail(exc: Exception) -> click.ClickException:
    return click.ClickException(str(exc))


# -- status ----------------------------------------------------------------------------------


def describe(status: dict[str, Any]) -> str:
    lines = [(f"index {status['index']!r}: served by {status['serving']} "
              f"({status.get('serving_spec') or 'unknown spec'})"),
             f"collections: {', '.join(status.get('collections') or []) or 'none'}"]
    m = status.get("migration")
    if not m:
        lines.append("no migration")
        return "\n".join(lines)
    lines.append(f"migration {m['id']}: {m['state']}{' (active)' if m['active'] else ''}"
                 + (f": {m['detail']}" if m.get("detail") else ""))
    lines.append(f"  from {m['source']} ({m['source_spec']})")
    lines.append(f"  to   {m['target']} ({m['target_spec']})")
    p = m.get("progress") or {}
    if p:
        age = m.get("heartbeat_age_s")
        lines.append(f"  backfill: {p.get('done', 0)}/{p.get('total', 0)} images checked, "
                     f"{p.get('reembedded', 0)} re-embedded, {p.get('failed', 0)} failed, "
                     f"{p.get('rate', 0)} img/s"
                     + (f", last progress {age:.0f}s ago by {p.get('owner')}" if age is not None
                        else ""))
        if p.get("failed_ids"):
            lines.append(f"  could not re-embed (first): {', '.join(p['failed_ids'][:5])}")
    gate = m.get("gate")
    if gate:
        verdict = "passed" if gate.get("passed") else "failed: " + "; ".join(gate["reasons"])
        diff = gate.get("diff") or {}
        lines.append(f"  gate {verdict} ({gate.get('found_first')}/{gate.get('sample')} "
                     f"sampled images found first; {diff.get('missing', 0)} missing, "
                     f"{diff.get('stale', 0)} stale, {diff.get('extra', 0)} extra)")
    if status.get("backfill_here"):
        lines.append("  the backfill runs inside `imgsearch up`")
    hints = {"ready": "next: imgsearch reindex swap",
             "swapped": "next: imgsearch reindex finish (drops the old collection), or "
                        "imgsearch reindex rollback",
             "rolled_back": "next: imgsearch reindex swap, or imgsearch reindex finish "
                            "(drops the new collection: cancels)",
             "stopped": "next: imgsearch reindex start (resumes)",
             "failed": "next: fix what the gate says, then imgsearch reindex start (resumes) "
                       "or swap --allow-missing"}
    if m["active"] and m["state"] in hints:
        lines.append(hints[m["state"]])
    return "\n".join(lines)


def _follow(get_status: Any, *, until: tuple[str, ...] = DONE_STATES,
            interval_s: float = 1.0) -> dict[str, Any]:
    """A progress bar from the record until the migration reaches one of ``until``."""
    from tqdm import tqdm

    bar = tqdm(unit="img", desc="re-indexing", file=sys.stderr)
    try:
        while True:
            status = get_status()
            m = status.get("migration") or {}
            p = m.get("progress") or {}
            if p.get("total") is not None:
                bar.total = int(p.get("total") or 0)
                bar.n = int(p.get("done") or 0)
                bar.set_postfix(state=m.get("state"), failed=p.get("failed", 0), refresh=False)
                bar.refresh()
            if not m or m.get("state") in until:
                return status
            time.sleep(interval_s)
    finally:
        bar.close()


# -- the commands ----------------------------------------------------------------------------


@click.group("reindex")
def reindex() -> None:
    """Move a live index to another model, reduction or quantization, without downtime.

    start builds a new collection beside the serving one and re-embeds every image into
    it while the workers write every new event to both; swap makes it serve (once it holds
    every image); rollback swaps back; finish drops the collection that does not serve.
    """


data_dir_option = click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path),
                               help=DATA_DIR_HELP)


def _act(found: Any, data_dir: Path | None, path: str, act: Callable[[Any], object],
         body: dict[str, Any] | None = None) -> None:
    """Ask the running `imgsearch up` to do it (``POST path``), or do it to the data
    directory in this process with ``act(Reindex)``; print the status either way."""
    try:
        if found is not None:
            click.echo(describe(UpClient(found).call("POST", path, body)))
            return
        local = _local(data_dir)
        try:
            act(local)
            click.echo(describe(local.status().as_dict()))
        finally:
            local.specs.close()
    except ImgSearchError as exc:
        raise _fail(exc) from exc


@reindex.command("status")
@data_dir_option
@click.option("--json", "as_json", is_flag=True, help="Print the status as JSON.")
@click.option("--watch", is_flag=True, help="Show a progress bar until the backfill ends.")
def status_command(data_dir: Path | None, as_json: bool, watch: bool) -> None:
    """Which collection serves the index, and the migration's state and progress."""
    found = _running_up(data_dir)
    if found is not None:
        up = UpClient(found)
        get = lambda: up.call("GET")
    else:
        local = _local(data_dir)
        get = lambda: local.status().as_dict()
    try:
        status = _follow(get, until=DONE_STATES) if watch else get()
    except ImgSearchError as exc:
        raise _fail(exc) from exc
    click.echo(json.dumps(status, indent=2, default=str) if as_json else describe(status))


@reindex.command("start")
@click.option("--model", help="timm model name of the new spec (default: the current one).")
@click.option("--weights", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Local weights file of the new model.")
@click.option("--random-weights", is_flag=True,
              help="The new model with random weights (speed tests only: its results mean "
                   "nothing).")
@click.option("--variant", help="How the new collection keeps vectors: full, random:N, pca:N, "
                                "int8, binary, or e.g. pca:320+int8 (as imgsearch eval).")
@click.option("--reduction-file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="A fitted PCA for pca:N (imgsearch eval --save-reductions).")
@click.option("--rate", type=click.FloatRange(0), help="Images re-embedded per second at "
                                                       "most (REINDEX_RATE; 0: no limit).")
@click.option("--swap/--no-swap", default=False, show_default=True,
              help="Swap as soon as the gate passes.")
@click.option("--detach", is_flag=True,
              help="Beside `imgsearch up`: return at once, the backfill goes on in `up`.")
@data_dir_option
def start_command(model: str | None, weights: Path | None, random_weights: bool,
                  variant: str | None, reduction_file: Path | None, rate: float | None,
                  swap: bool, detach: bool, data_dir: Path | None) -> None:
    """Start a migration to a new spec and run its backfill (or resume the one in progress).

    Workers begin writing every event to both collections within REINDEX_POLL_S. The
    backfill re-embeds each stored image into the new collection, then reconciles the
    two and checks the gate; Ctrl-C stops it and `start` again resumes it.
    """
    from shared.reindex.spec import spec_overrides

    try:
        target = spec_overrides(model=model, weights=weights, random_weights=random_weights,
                                variant=variant, reduction_file=reduction_file)
    except ImgSearchError as exc:
        raise click.UsageError(str(exc)) from exc
    found = _running_up(data_dir)
    if found is not None:
        up = UpClient(found)
        body = {"model": model, "weights": str(weights.absolute()) if weights else None,
                "random_weights": random_weights, "variant": variant,
                "reduction_file": str(reduction_file.absolute()) if reduction_file else None,
                "swap": swap}
        up.call("POST", "/start", body)
        click.echo(f"started in {found.describe()}", err=True)
        if not detach:
            click.echo(describe(_follow(lambda: up.call("GET"))))
        return
    if rate is not None:
        os.environ["REINDEX_RATE"] = str(rate)
    local = _local(data_dir)
    _run_here(local, target, swap)


def _run_here(local: Any, target: dict[str, Any], swap: bool) -> None:
    from tqdm import tqdm

    stop = threading.Event()
    bar = tqdm(unit="img", desc="re-indexing", file=sys.stderr)

    def progress(p: dict[str, Any]) -> None:
        bar.total = int(p.get("total") or 0)
        bar.n = int(p.get("done") or 0)
        bar.set_postfix(rate=p.get("rate"), failed=p.get("failed", 0), refresh=False)
        bar.refresh()

    try:
        migration = local.active() if not target and local.migration() else local.start(target)
        click.echo(f"migration {migration.id}: {migration.source} -> {migration.target}",
                   err=True)
        result = local.run(stop=stop, swap=swap, on_progress=progress)
    except KeyboardInterrupt:
        stop.set()
        bar.close()
        click.echo("interrupted: the checkpoint is kept; `imgsearch reindex start` resumes",
                   err=True)
        sys.exit(130)
    except ImgSearchError as exc:
        bar.close()
        raise _fail(exc) from exc
    finally:
        bar.close()
        local.specs.close()
    if result is None:
        sys.exit(130)
    click.echo(describe(local.status().as_dict()))
    if not result.passed:
        sys.exit(1)


@reindex.command("swap")
@click.option("--allow-missing", is_flag=True,
              help="Swap even though some images could not be re-embedded (their source is "
                   "gone); they will be missing from the new collection.")
@click.option("--eval", "eval_dataset", type=click.Path(exists=True, path_type=Path),
              help="Also require the new spec's quality on this labelled set "
                   "(imgsearch eval's DATASET).")
@click.option("--min-map", type=click.FloatRange(0, 1), default=0.0, show_default=True,
              help="With --eval: the least mAP@10 the new spec must reach.")
@data_dir_option
def swap_command(allow_missing: bool, eval_dataset: Path | None, min_map: float,
                 data_dir: Path | None) -> None:
    """Check the gate (the new collection holds every image, and images find themselves),
    then make the new collection serve, atomically."""
    found = _running_up(data_dir)
    if eval_dataset is not None:
        status = UpClient(found).call("GET") if found else _local(data_dir).status().as_dict()
        _eval_gate(status, eval_dataset, min_map)
    _act(found, data_dir, "/swap", lambda local: local.swap(allow_missing=allow_missing),
         {"allow_missing": allow_missing})


def _eval_gate(status: dict[str, Any], dataset: Path, min_map: float) -> None:
    """Run imgsearch eval's label retrieval for the migration's target spec."""
    from imgsearch.evaluation.dataset import load_dataset
    from imgsearch.evaluation.runner import EvalOptions, ModelChoice, Variant, evaluate

    m = status.get("migration") or {}
    if not m.get("active"):
        raise click.ClickException("no migration in progress: nothing to evaluate")
    local = _local(None)
    try:
        load = local.active().target_load
    finally:
        local.specs.close()
    weights = Path(load["model_weights"]) if load.get("model_weights") else None
    choice = ModelChoice(load["model_name"], weights,
                         random_weights=not load.get("model_pretrained", True) and not weights)
    variant = Variant(load.get("vector_reduction", "none"), load.get("vector_dim"),
                      load.get("quantization", "none"))
    click.echo(f"eval: {choice.name} {variant.name} on {dataset}", err=True)
    report = evaluate([load_dataset(dataset)], [choice], [variant],
                      EvalOptions(ks=(10,), latency_sample=1),
                      say=lambda line: click.echo(line, err=True))
    results = [v for v in report.runs[0].variants if v.variant == variant.name] or \
        report.runs[0].variants
    score = float((results[-1].labels or {}).get("mAP@10", 0.0))
    click.echo(f"eval: mAP@10 {score:.4f} (required {min_map})", err=True)
    if score < min_map:
        raise click.ClickException(f"the new spec's mAP@10 on {dataset} is {score:.4f}, below "
                                   f"--min-map {min_map}: not swapping")


@reindex.command("rollback")
@data_dir_option
def rollback_command(data_dir: Path | None) -> None:
    """Make the old collection serve again (the workers kept it current)."""
    _act(_running_up(data_dir), data_dir, "/rollback", lambda local: local.rollback())


@reindex.command("finish")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@data_dir_option
def finish_command(yes: bool, data_dir: Path | None) -> None:
    """End the migration: dual-writes stop and the collection that does not serve is
    dropped (the old one after a swap; the new one after a rollback, which cancels)."""
    found = _running_up(data_dir)
    try:
        if not yes and sys.stdin.isatty():
            status = UpClient(found).call("GET") if found else _local(data_dir).status().as_dict()
            m = status.get("migration") or {}
            dropped = m.get("source") if status.get("serving") == m.get("target") else \
                m.get("target")
            click.confirm(f"drop collection {dropped}?", abort=True)
    except ImgSearchError as exc:
        raise _fail(exc) from exc
    _act(found, data_dir, "/finish", lambda local: local.finish())


@reindex.command("stop")
@data_dir_option
def stop_command(data_dir: Path | None) -> None:
    """Stop the backfill running inside `imgsearch up` (start resumes it)."""
    found = _running_up(data_dir)
    if found is None:
        raise click.ClickException("no `imgsearch up` runs on this data directory; a backfill "
                                   "started with `imgsearch reindex start` stops with Ctrl-C")
    click.echo(describe(UpClient(found).call("POST", "/stop")))

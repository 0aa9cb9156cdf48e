"""``imgsearch eval``: the command line over runner (measure) and report (write)."""

from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path
from typing import Any

import click

from shared.errors import ImgSearchError

VARIANTS_HELP = (
    "Comma-separated ways to store the vectors, each compared with full-size float32: "
    "full, random:N, pca:N, int8, binary, binary:x8 (rescore 8x the results; binary's "
    "default is x4), or a reduction plus a quantization, e.g. pca:320+int8, random:1280+binary."
)


def _csv(value: str | None) -> list[str]:
    return [p.strip() for p in (value or "").split(",") if p.strip()]


def _command_line() -> str | None:
    program = os.path.basename(sys.argv[0]) if sys.argv else ""
    if program in ("imgsearch", "__main__.py") and len(sys.argv) > 1:
        return "imgsearch " + shlex.join(sys.argv[1:])
    return None


def _models(names: list[str], weights: tuple[str, ...], random_weights: bool,
            settings: Any) -> list[Any]:
    from imgsearch.evaluation.runner import ModelChoice

    files: dict[str, Path] = {}
    for entry in weights:
        name, sep, path = entry.rpartition("=")
        if not sep:
            name = names[0]
        if name not in names:
            raise click.BadParameter(f"{name!r} is not one of the --model names", param_hint="--weights")
        if not Path(path).is_file():
            raise click.BadParameter(f"{path} is not a file", param_hint="--weights")
        files[name] = Path(path)
    if settings.model_weights and settings.model_name in names:
        files.setdefault(settings.model_name, settings.model_weights)
    return [ModelChoice(n, files.get(n), random_weights=random_weights and n not in files)
            for n in names]


@click.command("eval")
@click.argument("datasets", nargs=-1, required=True,
                type=click.Path(exists=True, path_type=Path))
@click.option("--copies", is_flag=True,
              help="Find the source: index the originals, query with edited copies of them.")
@click.option("--labels/--no-labels", default=True, show_default=True,
              help="Label retrieval (mAP@k, mHR@k, R@1) on datasets that have labels.")
@click.option("--model", "model_names", metavar="NAME[,NAME...]",
              help="timm models to compare side by side (default: MODEL_NAME).")
@click.option("--weights", multiple=True, metavar="[NAME=]PATH",
              help="Local weights file for a model (repeatable; a bare PATH is for the first "
                   "model). MODEL_WEIGHTS applies to MODEL_NAME.")
@click.option("--random-weights", is_flag=True,
              help="Models without a weights file get random weights instead of the hub's: "
                   "their quality columns are meaningless, their speed columns are not.")
@click.option("--variants", "variant_text", default="full", show_default=True, help=VARIANTS_HELP)
@click.option("--k", "k_text", default="1,5,10", show_default=True, help="Cut-offs k for @k metrics.")
@click.option("--split/--ignore-split", "use_split", default=True, show_default=True,
              help="Use the CSV's train/test split (gallery/queries); --ignore-split queries "
                   "every image against all the others.")
@click.option("--label-column", default="label", show_default=True, help="CSV column with the label.")
@click.option("--edits", "edit_text", metavar="NAME[,NAME...]",
              help="Edits for --copies (default: all). See imgsearch/evaluation/edits.py.")
@click.option("--copies-sample", default=500, show_default=True, type=click.IntRange(1),
              help="Originals (seeded sample of the gallery) to make edited copies of.")
@click.option("--limit", type=click.IntRange(1), help="Evaluate a seeded subset of each dataset.")
@click.option("--seed", default=0, show_default=True, help="Seed for samples and edits.")
@click.option("--pca-sample", default=2000, show_default=True, type=click.IntRange(1),
              help="Gallery vectors a PCA is fitted on.")
@click.option("--reduction-seed", default=0, show_default=True, type=click.IntRange(0),
              help="Seed of random projections (VECTOR_REDUCTION_SEED).")
@click.option("--rescore/--no-rescore", default=True, show_default=True,
              help="Rescore quantized candidates with the float32 vectors.")
@click.option("--oversampling", type=click.FloatRange(1.0, 100.0),
              help="Quantized candidates per result when rescoring (Qdrant default 1).")
@click.option("--batch-size", default=32, show_default=True, type=click.IntRange(1, 1024))
@click.option("--latency-sample", default=50, show_default=True, type=click.IntRange(1),
              help="Queries timed end to end, one at a time.")
@click.option("--device", help="cpu, cuda, cuda:N or auto (default: DEVICE).")
@click.option("--out", "out_dir", default="eval-report", show_default=True,
              type=click.Path(file_okay=False, path_type=Path),
              help="Folder for report.json and report.md.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path),
              help="Write the JSON report here instead.")
@click.option("--markdown", "markdown_path", type=click.Path(dir_okay=False, path_type=Path),
              help="Write the Markdown report here instead (e.g. docs/quality.md).")
@click.option("--save-reductions", type=click.Path(file_okay=False, path_type=Path),
              help="Save each fitted PCA here, for VECTOR_REDUCTION_FILE.")
def eval_command(datasets: tuple[Path, ...], copies: bool, labels: bool,
                 model_names: str | None, weights: tuple[str, ...], random_weights: bool,
                 variant_text: str, k_text: str, use_split: bool, label_column: str,
                 edit_text: str | None, copies_sample: int, limit: int | None, seed: int,
                 pca_sample: int, reduction_seed: int, rescore: bool, oversampling: float | None,
                 batch_size: int, latency_sample: int, device: str | None, out_dir: Path,
                 json_path: Path | None, markdown_path: Path | None,
                 save_reductions: Path | None) -> None:
    """Measure retrieval quality, speed and memory on DATASET (a folder with one sub-folder
    per label, or a CSV path,label[,split]; a folder holding labels.csv reads that).

    Each model and variant indexes the gallery into a temporary embedded store through
    the real pipeline, then queries it. Prints a table; writes JSON and Markdown reports.
    """
    from imgsearch.cli import settings_or_exit
    from imgsearch.evaluation import report as rep
    from imgsearch.evaluation.dataset import DatasetError, load_dataset
    from imgsearch.evaluation.edits import resolve_edits
    from imgsearch.evaluation.runner import EvalOptions, Variant, evaluate

    try:
        variants = [Variant.parse(v) for v in _csv(variant_text)]
        ks = tuple(sorted({int(k) for k in _csv(k_text)}))
        edits = tuple(_csv(edit_text)) or None
        resolve_edits(edits)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from exc
    if not ks or min(ks) < 1:
        raise click.BadParameter("cut-offs must be positive integers", param_hint="--k")
    base: dict[str, Any] = {"device": device} if device else {}
    settings = settings_or_exit(**base, qdrant_url=None)
    names = _csv(model_names) or [settings.model_name]
    models = _models(names, weights, random_weights, settings)
    try:
        loaded = [load_dataset(d, label_column=label_column) for d in datasets]
    except DatasetError as exc:
        raise click.ClickException(str(exc)) from exc
    options = EvalOptions(
        ks=ks, labels=labels, copies=copies, edits=edits, copies_sample=copies_sample,
        use_split=use_split, limit=limit, seed=seed, reduction_seed=reduction_seed,
        pca_sample=pca_sample, rescore=rescore, oversampling=oversampling,
        latency_sample=latency_sample, batch_size=batch_size, save_reductions=save_reductions,
    )
    try:
        result = evaluate(loaded, models, variants, options, base=base,
                          say=lambda line: click.echo(line, err=True))
    except (ImgSearchError, ValueError) as exc:
        hint = ""
        if "hub" in str(exc):
            hint = " (or pass --random-weights to measure speed only)"
        raise click.ClickException(f"{exc}{hint}") from exc

    result.command = _command_line()
    click.echo(rep.terminal(result))
    json_path = json_path or out_dir / "report.json"
    markdown_path = markdown_path or out_dir / "report.md"
    for path, text in ((json_path, rep.to_json(result)),
                       (markdown_path, rep.markdown(result))):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    click.echo(f"wrote {json_path} and {markdown_path}", err=True)

"""`dicom-ai-node evaluate MODEL DATASET`: the command (registered by dicom_ai_node/cli.py).

Exit codes: 0 when the report was written and at least one case was evaluated (failed cases are listed
on stderr and in the report), 1 when no case could be evaluated, 2 for an unknown model, a models path
or dataset that does not exist, or a malformed dataset.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from dicom_ai_node.errors import ConfigError, InferenceError, ModelNotFoundError

log = logging.getLogger(__name__)


def evaluate_command(
    model: Annotated[str, typer.Argument(help="Model name, as `dicom-ai-node models list` shows it")],
    dataset: Annotated[Path, typer.Argument(help="Dataset folder (layouts: docs/evaluation.md)")],
    out: Annotated[
        Path, typer.Option("--out", "-o", help="Folder for evaluation.json, report.html/.md, PNGs")
    ] = Path("evaluation"),
    device: Annotated[str, typer.Option(help="auto, cpu or cuda")] = "auto",
    models_path: Annotated[
        list[Path] | None,
        typer.Option("--models-path", help="Extra model folder (repeatable), like models.paths"),
    ] = None,
) -> None:
    """Validate a model locally: Dice/HD95/volume error or accuracy/precision/recall/AUC, with a report."""
    from tqdm.contrib.logging import logging_redirect_tqdm

    from dicom_ai_node.evaluate.reference import DatasetError
    from dicom_ai_node.evaluate.run import evaluate
    from dicom_ai_node.infer.registry import default_registry

    logging.basicConfig(
        level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    logging.getLogger("highdicom").setLevel(logging.ERROR)
    for path in models_path or []:
        if not path.exists():
            _fail(f"--models-path {path} does not exist", 2)
    try:
        registry = default_registry(device, models_path or [])
        # Log lines (a failed case) go above the progress bar instead of through it.
        with logging_redirect_tqdm():
            results = evaluate(model, dataset, out, registry, device)
    except (ModelNotFoundError, DatasetError, ConfigError, InferenceError) as exc:
        # InferenceError here: the model did not load (e.g. weights not matching the manifest's sha256).
        _fail(str(exc), 2)
    _echo_summary(results, out)
    if results["dataset"]["n_evaluated"] == 0:
        _fail(f"no case could be evaluated (report in {out})", 1)


def _echo_summary(results: dict[str, Any], out: Path) -> None:
    data = results["dataset"]
    typer.echo(
        f"{results['model']['name']} {results['model']['version']} on {data['name']}: "
        f"{data['n_evaluated']}/{data['n_cases']} cases evaluated"
    )
    if results["task"] == "segmentation":
        for s in results["labels"]:
            d, h = s["dice"], s["hd95_mm"]
            typer.echo(
                f"  {s['label']}: Dice mean {_f(d['mean'])} (min {_f(d['min'])}), HD95 median {_f(h['median'], 1)} mm"
            )
    else:
        for f in results["findings"]:
            typer.echo(
                f"  {f['finding']}: AUC {_f(f['auc']['value'])}, sensitivity {_f(f['recall']['value'])}, "
                f"specificity {_f(f['specificity']['value'])} (n={f['n']})"
            )
    for case in results["cases"]:
        if case["status"] != "ok":
            typer.echo(f"  failed: {case['case']}: {case['error']}", err=True)
    typer.echo(f"report: {out / 'report.html'} ({out / 'report.md'}, {out / 'evaluation.json'})")


def _f(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _fail(message: str, code: int) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)

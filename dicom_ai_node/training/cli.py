"""`dicom-ai-node train ...`: training commands (registered on the main app as `train`)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

train_app = typer.Typer(help="Train the built-in CNNs (CPU, seeded, reproducible).", no_args_is_help=True)


@train_app.callback()
def _group() -> None:
    """Train the built-in CNNs (CPU, seeded, reproducible)."""
    # A callback keeps `train` a command group even with one command, so `train ct-lung` stays valid.


@train_app.command("ct-lung")
def ct_lung(
    out: Annotated[Path, typer.Option("--out", help="Directory for model.pt and manifest.yaml")],
    seed: Annotated[int, typer.Option(help="Seed of phantoms, data order and initial weights")] = 0,
    iterations: Annotated[
        int | None, typer.Option(help="Training steps (default: the shipped model's)")
    ] = None,
    phantoms: Annotated[
        int | None, typer.Option(help="Synthetic phantoms (default: the shipped model's)")
    ] = None,
    real: Annotated[
        list[str] | None,
        typer.Option(help="Real CTs to train on, repeatable (default: lung1 and lung2)"),
    ] = None,
    no_real: Annotated[bool, typer.Option("--no-real", help="Phantoms only")] = False,
) -> None:
    """Train ct-lung (3-D UNet, right/left lung) on phantoms and the real chest CTs; ~25 min on 2 cores."""
    # Deferred: torch and monai load only when a training command runs.
    from dicom_ai_node.training.data import REAL_CASES, DataMissingError
    from dicom_ai_node.training.train_ct_lung import DEFAULT_ITERATIONS, DEFAULT_PHANTOMS, train_ct_lung

    cases: tuple[str, ...] = () if no_real else tuple(real) if real else REAL_CASES
    unknown = [c for c in cases if c not in REAL_CASES]
    if unknown:
        raise typer.BadParameter(f"unknown real CT {unknown[0]!r} (known: {', '.join(REAL_CASES)})")
    try:
        train_ct_lung(
            out,
            seed=seed,
            iterations=iterations if iterations is not None else DEFAULT_ITERATIONS,
            phantoms=phantoms if phantoms is not None else DEFAULT_PHANTOMS,
            real_cases=cases,
            log=typer.echo,
        )
    except DataMissingError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc

"""The Typer app and what every subcommand shares: error handling, output, common options, choices."""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Iterable
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from ..errors import CheckFailed, KdexportError, TrainingError
from ..kernels import KernelConfigError
from ..models import ModelError
from ..preflight import DEVICE_HINT, check_device
from ..vocab import FINETUNE_EPOCHS, RECIPE_NAMES, STEMS

app = typer.Typer(help="Distil, prune, export and profile image classifiers for small devices.",
                  no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False)
stdout = Console(width=None if sys.stdout.isatty() else 200)  # piped: do not truncate columns
err = Console(stderr=True)

EXIT_FAILED, EXIT_USAGE = 1, 2
USER_ERRORS = (KdexportError, ModelError, KernelConfigError)  # one line on stderr, exit 2


def command(fn):
    """Register a subcommand whose user errors become one stderr line and an exit code."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            check_device(kwargs.get("device"))  # every command with --device, before any work
            return fn(*args, **kwargs)
        except (CheckFailed, TrainingError) as exc:
            err.print(f"[red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
            raise typer.Exit(EXIT_FAILED) from None
        except USER_ERRORS as exc:
            err.print(f"[red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
            raise typer.Exit(EXIT_USAGE) from None
        except KeyboardInterrupt:
            err.print("interrupted; finished stages are kept, rerun the same command to resume")
            raise typer.Exit(130) from None

    return app.command()(wrapper)


def choices(name: str, values: Iterable[str]) -> type[Enum]:
    """A str Enum for Typer's choices, built from one of the library's tuples (never re-typed here)."""
    return Enum(name, {v: v for v in values}, type=str)


def emit(rows: list[dict[str, Any]], title: str, as_json: bool, payload: Any = None) -> None:
    """Print rows as a rich table, or `payload` (default: the rows) as JSON on stdout."""
    if as_json:
        sys.stdout.write(json.dumps(rows if payload is None else payload, indent=2, default=str) + "\n")
        return
    table = Table(title=title)
    for key in rows[0] if rows else []:
        table.add_column(key, justify="right" if isinstance(rows[0][key], int | float) else "left")
    for row in rows:
        table.add_row(*(fmt(v) for v in row.values()))
    stdout.print(table)


def fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1e4 else f"{v:.3e}"
    if isinstance(v, int) and abs(v) >= 10_000:
        return f"{v:,}"
    return "" if v is None else str(v)


def log(msg: str) -> None:
    """Progress for long commands: stderr, so stdout stays machine-readable."""
    err.print(msg, highlight=False, soft_wrap=True)


JsonOpt = Annotated[bool, typer.Option("--json", help="Write machine-readable JSON to stdout.")]
DataDirOpt = Annotated[Path | None, typer.Option("--data-dir", help="Local dataset root (not needed for digits).")]
SeedOpt = Annotated[int, typer.Option(help="Random seed.")]
OfficialOpt = Annotated[bool, typer.Option("--official-simkd", help="SimKD exactly as the official code: the "
                                            "feature MSE alone (--cls-weight 0) and no output-BN moment match.")]
FinetuneEpochsOpt = Annotated[int | None, typer.Option(
    help="Fine-tuning epochs after pruning [per method: " + ", ".join(f"{m} {e}" for m, e in FINETUNE_EPOCHS.items())
    + "].")]
ValFractionOpt = Annotated[float, typer.Option(help="Fraction of the training part held out for validation "
                                                    "(every choice is made on it; test is only reported).")]
DeviceOpt = Annotated[str, typer.Option(help=f"Where to run: {DEVICE_HINT.removeprefix('use ')}.")]
ImageSizeOpt = Annotated[str | None, typer.Option(help="Input size N or H,W (each >= 32) [32 for digits, cifar and "
                                                      "mnist; 224 for imagefolder]; recorded in the checkpoint.")]
SpecSizeOpt = Annotated[str | None, typer.Option("--image-size", help="Input size N or H,W: taken from the "
                                                 "checkpoint; if given, it must agree.")]
WorkersOpt = Annotated[int | None, typer.Option(help="DataLoader worker processes [0 for the in-memory datasets; "
                                                    "for imagefolder one per core less one, at most 8].")]

Stem = choices("Stem", STEMS)
RecipeName = choices("RecipeName", RECIPE_NAMES)

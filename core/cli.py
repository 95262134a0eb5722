"""The ``cnnserve`` command line: train, export, and (as they land) archive, serve, predict.

Every expected failure prints one line on stderr and exits non-zero; tracebacks are kept
for real bugs.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(
    help="Serve the tutorial's ConvNet and FCN over the Open Inference Protocol.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

DEFAULT_ARTIFACTS = Path("artifacts")

ModelName = Annotated[str, typer.Argument(help="Model name: convnet or fcn.")]


@contextmanager
def user_errors() -> Iterator[None]:
    """Turn the errors a user can fix into one line on stderr and exit status 2."""
    from cnnserve.errors import CnnserveError
    from cnnserve.export.exporter import ExportError
    from cnnserve.models.checkpoint import CheckpointError

    try:
        yield
    except (CnnserveError, CheckpointError, ExportError, FileNotFoundError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None


@app.command()
def train(
    model: ModelName,
    seed: Annotated[int, typer.Option(help="Seed for data, split and initialisation.")] = 0,
    out: Annotated[
        Path | None, typer.Option(help="Directory for the checkpoint and manifest.")
    ] = None,
) -> None:
    """Train the demo weights for MODEL from a fixed seed (a few minutes on 2 CPU cores)."""
    from cnnserve.models.registry import WEIGHTS_DIR, get_spec
    from cnnserve.training.train import train_convnet, train_fcn

    with user_errors():
        spec = get_spec(model)
    trainer = train_convnet if spec.name == "convnet" else train_fcn
    result = trainer(seed=seed, out_dir=out or WEIGHTS_DIR)
    typer.echo(
        f"{spec.name}: {result.metric_name}={result.metric:.4f} in {result.seconds:.0f}s "
        f"→ {result.checkpoint} (sha256 {result.sha256[:12]}…)"
    )


@app.command()
def export(
    model: ModelName,
    checkpoint: Annotated[
        Path | None,
        typer.Option(
            help="Weights to export: a cnnserve checkpoint or a tutorial state_dict. "
            "Default: the committed demo weights."
        ),
    ] = None,
    out: Annotated[
        Path, typer.Option(help="Directory for <name>.pt, .onnx and .json.")
    ] = DEFAULT_ARTIFACTS,
) -> None:
    """Export MODEL to TorchScript and ONNX, verifying parity against the eager network."""
    from cnnserve.export.exporter import export_model
    from cnnserve.models.checkpoint import load_network
    from cnnserve.models.registry import get_spec

    with user_errors():
        spec = get_spec(model)
        weights = checkpoint or spec.weights_path
        network = load_network(spec, weights)
        result = export_model(spec, network, out, weights)
    typer.echo(
        f"{spec.name}: {result.torchscript}, {result.onnx}, {result.metadata} "
        f"(parity max-abs diff {result.max_abs_diff:.2e})"
    )


@app.command()
def bench(
    profile_name: Annotated[
        str, typer.Option("--profile", help="quick (a few minutes) or full (the whole matrix).")
    ] = "quick",
    backend: Annotated[
        list[str] | None,
        typer.Option(help="Backends to measure (repeatable); default onnxruntime."),
    ] = None,
    artifacts: Annotated[Path, typer.Option(help="Exported models.")] = DEFAULT_ARTIFACTS,
    docs: Annotated[Path, typer.Option(help="Where benchmarks.md and bench/ go.")] = Path("docs"),
    duration_s: Annotated[float, typer.Option(help="Measured seconds per scenario.")] = 8.0,
    warmup_s: Annotated[float, typer.Option(help="Unmeasured seconds before each.")] = 2.0,
    processes: Annotated[int, typer.Option(help="Client processes generating load.")] = 2,
) -> None:
    """Benchmark real gateway processes against their baselines; write docs/benchmarks.md."""
    from cnnserve.bench.run import run_benchmarks

    if profile_name not in {"quick", "full"}:
        typer.echo(f"error: unknown profile {profile_name!r}; use quick or full", err=True)
        raise typer.Exit(2)
    with user_errors():
        path = run_benchmarks(
            profile_name,
            backend or ["onnxruntime"],
            artifacts,
            docs,
            duration_s,
            warmup_s,
            processes,
        )
    typer.echo(f"wrote {path}")


def main() -> None:
    """Entry point for ``python -m cnnserve``."""
    sys.exit(app())

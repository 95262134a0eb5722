"""The ``cnnserve`` command line (also ``python -m cnnserve``).

``train`` and ``export`` make the demo weights and the TorchScript/ONNX artifacts;
``archive`` and ``torchserve start|stop|status`` package and run TorchServe; ``serve`` runs
the gateway and ``config`` shows the settings it would run with (both take every setting as a
flag, :mod:`cnnserve.setting_flags`); ``predict`` calls a running gateway; ``bench``,
``soak``, ``overload``, ``hotpath`` and ``gpu-check`` measure it. Each command imports what it
needs only when it runs, so ``predict`` and ``--help`` work with cnnserve's core dependencies
alone; a command whose extra is not installed says which one to install
(``pip install 'cnnserve[export]'``).

Every expected failure prints one line on stderr and exits with status 2; tracebacks are
kept for real bugs. docs/cli.md describes every command.
"""

from __future__ import annotations

import errno
import importlib.metadata
import json
import shutil
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

import typer
from typer.core import TyperOption

from cnnserve.errors import needs_extra
from cnnserve.setting_flags import read_settings, secret_names, with_setting_flags

if TYPE_CHECKING:
    from cnnserve.settings import Settings

app = typer.Typer(
    help="Serve the tutorial's ConvNet and FCN over the Open Inference Protocol.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)


def _flags_show_no_type() -> None:
    """typer prints ``<bool>`` beside an on/off flag, as if it took a value; it takes none."""
    display_type_rich = TyperOption.display_type_rich

    def without_flags(self: TyperOption, ctx: Any) -> str | None:
        return None if self.is_flag else display_type_rich(self, ctx)

    setattr(TyperOption, "display_type_rich", without_flags)  # noqa: B010


_flags_show_no_type()


def _show_version(value: bool) -> None:
    if value:
        typer.echo(f"cnnserve {importlib.metadata.version('cnnserve')}")
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_show_version, is_eager=True, help="Print the version and exit."
        ),
    ] = False,
) -> None:
    """The options of cnnserve itself, given before any command (the help is the app's)."""


DEFAULT_ARTIFACTS = Path("artifacts")

ModelName = Annotated[str, typer.Argument(help="Model name: convnet or fcn.")]
ArchitectureName = Literal["convnet", "fcn"]


class UsageError(Exception):
    """Options that do not fit together; the message says what to give."""


@contextmanager
def user_errors() -> Iterator[None]:
    """Turn the errors a user can fix into one line on stderr and exit status 2."""
    from cnnserve.errors import CnnserveError
    from cnnserve.export import ExportError
    from cnnserve.models import CheckpointError
    from cnnserve.models.repository import RepositoryError
    from cnnserve.torchserve_engine import TorchServeError

    try:
        yield
    except (
        CnnserveError,
        CheckpointError,
        ExportError,
        RepositoryError,
        TorchServeError,
        UsageError,
        FileNotFoundError,
    ) as exc:
        typer.echo(f"error: {error_text(exc)}", err=True)
        raise typer.Exit(2) from None


def error_text(exc: Exception) -> str:
    """An exception's message; a file that cannot be read as ``path: why``."""
    if isinstance(exc, OSError) and exc.filename is not None:
        return f"{exc.filename}: {exc.strerror}"
    return str(exc)


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

    with user_errors():
        spec = get_spec(model)
        with needs_extra("train", "cnnserve train"):
            from cnnserve.training.train import train_convnet, train_fcn
    trainer = train_convnet if spec.name == "convnet" else train_fcn
    result = trainer(seed=seed, out_dir=out or WEIGHTS_DIR)
    typer.echo(
        f"{spec.name}: {result.metric_name}={result.metric:.4f} in {result.seconds:.0f}s "
        f"→ {result.checkpoint} (sha256 {result.sha256[:12]}…)"
    )


@app.command()
def export(
    model: Annotated[
        str | None,
        typer.Argument(help="A demo model (convnet or fcn): its weights, name and classes."),
    ] = None,
    arch: Annotated[
        ArchitectureName | None,
        typer.Option(help="The checkpoint's network (default: the demo MODEL's)."),
    ] = None,
    checkpoint: Annotated[
        Path | None,
        typer.Option(
            help="Weights to export: a cnnserve checkpoint or a tutorial state_dict. "
            "Default: the demo MODEL's committed weights."
        ),
    ] = None,
    name: Annotated[
        str | None, typer.Option(help="The model's name in the repository (default: MODEL).")
    ] = None,
    version: Annotated[
        int | None, typer.Option(help="Version to add (default: one past the highest).")
    ] = None,
    labels: Annotated[
        Path | None, typer.Option(help='Labels, one per line (default: "0"…"N-1").')
    ] = None,
    repository: Annotated[
        Path | None,
        typer.Option(help="Add the export to this model repository as a new version."),
    ] = None,
    out: Annotated[
        Path, typer.Option(help="Without --repository: directory for <name>.pt, .onnx, .json.")
    ] = DEFAULT_ARTIFACTS,
) -> None:
    """Export a checkpoint to TorchScript and ONNX, verifying parity against the eager network.

    With --repository, the class count comes from the checkpoint and the export becomes a new
    version of --name in the repository (config.yaml written when the model has none);
    without, a demo MODEL is written flat into --out.
    """
    with user_errors(), needs_extra("export", "cnnserve export"):
        if repository is None:
            if model is None:
                raise UsageError("give a demo MODEL (convnet or fcn), or --repository")
            typer.echo(_export_flat(model, checkpoint, out))
            return
        typer.echo(_export_version(model, arch, checkpoint, name, version, labels, repository))


def _export_flat(model: str, checkpoint: Path | None, out: Path) -> str:
    """A demo model's artifacts, flat into ``out``; the line to print."""
    from cnnserve.export.exporter import ExportPaths, export_model
    from cnnserve.models.checkpoint import load_network
    from cnnserve.models.registry import get_spec, weights_path

    spec = get_spec(model)
    weights = checkpoint or weights_path(spec.name)
    network = load_network(spec, weights)
    result = export_model(spec, network, ExportPaths.flat(out, spec.name), weights)
    return (
        f"{spec.name}: {result.torchscript}, {result.onnx}, {result.metadata} "
        f"(parity max-abs diff {result.max_abs_diff:.2e})"
    )


def _export_version(
    model: str | None,
    arch: str | None,
    checkpoint: Path | None,
    name: str | None,
    version: int | None,
    labels: Path | None,
    repository: Path,
) -> str:
    """A checkpoint as a new version in ``repository``; the line to print. A demo MODEL
    supplies whatever of architecture, weights, name and labels is not given."""
    from cnnserve.export.repository import export_to_repository, read_labels
    from cnnserve.models.registry import DEMO_CONFIGS, get_spec, weights_path
    from cnnserve.models.spec import Architecture

    demo = DEMO_CONFIGS[get_spec(model).name] if model is not None else None
    architecture = Architecture(arch) if arch else demo.architecture if demo else None
    weights = checkpoint or (weights_path(model) if model is not None else None)
    model_name = name or model
    if architecture is None or weights is None or model_name is None:
        raise UsageError("with --repository, give --arch, --checkpoint and --name")
    given_labels = read_labels(labels) if labels is not None else None
    if given_labels is None and demo is not None and checkpoint is None:
        given_labels = demo.labels
    added = export_to_repository(
        architecture, weights, model_name, repository, version, given_labels
    )
    return (
        f"{added.name} version {added.version}: {added.num_classes} classes → {added.folder} "
        f"(parity max-abs diff {added.result.max_abs_diff:.2e})"
    )


@app.command()
def bench(
    profile_name: Annotated[
        str, typer.Option("--profile", help="quick (a few minutes) or full (the whole matrix).")
    ] = "quick",
    backend: Annotated[
        list[str] | None,
        typer.Option(
            help="Backends to measure (repeatable); default: onnxruntime, torchscript and "
            "torchserve (with TorchServe alone as a baseline), torchserve only with Java."
        ),
    ] = None,
    artifacts: Annotated[Path, typer.Option(help="Exported models.")] = DEFAULT_ARTIFACTS,
    docs: Annotated[Path, typer.Option(help="Where benchmarks.md and bench/ go.")] = Path("docs"),
    duration_s: Annotated[float, typer.Option(help="Measured seconds per scenario.")] = 8.0,
    warmup_s: Annotated[float, typer.Option(help="Unmeasured seconds before each.")] = 2.0,
    processes: Annotated[int, typer.Option(help="Client processes generating load.")] = 2,
    report_only: Annotated[
        bool,
        typer.Option(
            "--report-only", help="Re-render the report from the last run's rows and notes."
        ),
    ] = False,
) -> None:
    """Benchmark real gateway processes against their baselines; write docs/benchmarks.md."""
    # matplotlib draws the plots at the end: checked first, so a missing one fails before
    # minutes of measuring, not after them.
    with user_errors(), needs_extra("bench", "cnnserve bench", "matplotlib"):
        from cnnserve.bench.run import default_backends, rerender, run_benchmarks

        if report_only:
            path = rerender(docs)
        elif profile_name not in {"quick", "full"}:
            raise UsageError(f"unknown profile {profile_name!r}; use quick or full")
        else:
            path = run_benchmarks(
                profile_name,
                backend or default_backends(),
                artifacts,
                docs,
                duration_s,
                warmup_s,
                processes,
            )
    typer.echo(f"wrote {path}")


SoakBackend = Literal["torchserve", "onnxruntime"]
ArtifactsOption = Annotated[Path, typer.Option(help="Exported models (make export).")]


@app.command()
def soak(
    duration_s: Annotated[float, typer.Option(min=0, help="Seconds of traffic.")] = 60.0,
    max_requests: Annotated[int, typer.Option(min=1, help="Requests sent at most.")] = 100_000,
    concurrency: Annotated[int, typer.Option(min=1, help="Concurrent callers.")] = 8,
    backend: Annotated[
        SoakBackend | None,
        typer.Option(
            help="torchserve: two replicas, killed and stalled in turn (needs Java 17); "
            "onnxruntime: the gateway stalled. Default: torchserve when java is on PATH."
        ),
    ] = None,
    fault_interval_s: Annotated[float, typer.Option(min=0, help="Seconds between faults.")] = 8.0,
    stall_s: Annotated[float, typer.Option(min=0, help="Seconds a stall lasts.")] = 2.0,
    artifacts: ArtifactsOption = DEFAULT_ARTIFACTS,
    seed: Annotated[int, typer.Option(help="Seed of the traffic mix.")] = 0,
) -> None:
    """Soak a real gateway with mixed valid and invalid traffic while faults are injected.

    Prints what was sent, succeeded, rejected, failed and lost; exits 1 when any request
    failed or was lost.
    """
    import tempfile

    chosen = backend or ("torchserve" if shutil.which("java") else "onnxruntime")
    with user_errors(), needs_extra("bench", "cnnserve soak"):
        from cnnserve.bench.soak import SoakOptions, run_soak

        with tempfile.TemporaryDirectory(prefix="cnnserve-soak-") as work:
            tally = run_soak(
                SoakOptions(
                    artifacts_dir=_exported(artifacts, "convnet.onnx"),
                    work_dir=Path(work),
                    backend=chosen,
                    duration_s=duration_s,
                    max_requests=max_requests,
                    concurrency=concurrency,
                    fault_interval_s=fault_interval_s,
                    stall_s=stall_s,
                    seed=seed,
                )
            )
    typer.echo(f"backend    {chosen}")
    typer.echo(tally.summary())
    if tally.failed or tally.lost:
        raise typer.Exit(1)


@app.command()
def overload(
    artifacts: ArtifactsOption = DEFAULT_ARTIFACTS,
    multiple: Annotated[
        list[float] | None,
        typer.Option(min=0, help="Load as a multiple of capacity (repeatable). Default: 2, 4, 8."),
    ] = None,
    duration_s: Annotated[float, typer.Option(min=0, help="Seconds per phase.")] = 5.0,
    max_queue_size: Annotated[int, typer.Option(min=1, help="The gateway's queue per model.")] = 16,
    log: Annotated[Path, typer.Option(help="The gateway's log.")] = Path("overload-gateway.log"),
) -> None:
    """Open-loop overload of a real gateway at several times its capacity; prints a table."""
    with user_errors(), needs_extra("bench", "cnnserve overload"):
        from cnnserve.bench.overload import run_overload

        report = run_overload(
            _exported(artifacts, "fcn.onnx"),
            log,
            tuple(multiple or (2.0, 4.0, 8.0)),
            duration_s,
            max_queue_size,
        )
    typer.echo(report.markdown())


@app.command()
def hotpath(
    profiles: Annotated[
        list[str] | None,
        typer.Argument(help="Profiles to record (default: all); an unknown name lists them."),
    ] = None,
    out: Annotated[Path, typer.Option(help="Directory for the profiles.")] = Path(
        "docs/bench/profiles"
    ),
    artifacts: ArtifactsOption = DEFAULT_ARTIFACTS,
    duration_s: Annotated[float, typer.Option(min=0, help="Seconds sampled per profile.")] = 10.0,
    suffix: Annotated[str, typer.Option(help="Appended to each profile's file name.")] = "",
) -> None:
    """Profile a real gateway under load with py-spy: the functions that hold the samples."""
    with user_errors(), needs_extra("bench", "cnnserve hotpath"):
        from cnnserve.bench.hotpath import PROFILES, Profile, record

        unknown = sorted(set(profiles or ()) - set(PROFILES))
        if unknown:
            raise UsageError(
                f"unknown profile {', '.join(unknown)}; choose from {', '.join(PROFILES)}"
            )
        for name in profiles or PROFILES:
            profile = PROFILES[name]
            if suffix:
                profile = Profile(**{**profile.__dict__, "name": f"{name}{suffix}"})
            result = record(profile, _exported(artifacts, "convnet.onnx"), out, duration_s)
            typer.echo(
                f"{profile.name}: {result.requests_per_s:.0f} req/s, p50 {result.p50_ms:.2f} ms"
            )


@app.command()
def scaling(
    artifacts: ArtifactsOption = DEFAULT_ARTIFACTS,
    concurrency: Annotated[int, typer.Option(min=1, help="Closed-loop callers.")] = 64,
    duration_s: Annotated[float, typer.Option(min=0, help="Seconds measured per layout.")] = 10.0,
    out: Annotated[Path | None, typer.Option(help="Also write the rows here (JSON).")] = None,
) -> None:
    """One gateway process, N frontends feeding one batching process, and N independent
    gateways under the same load; a JSON line of figures per layout (docs/scaling.md)."""
    import json

    with user_errors(), needs_extra("bench", "cnnserve scaling"):
        from cnnserve.bench.scaling import run_scaling

        rows = []
        for row in run_scaling(_exported(artifacts, "convnet.onnx"), concurrency, duration_s):
            typer.echo(json.dumps(row))
            rows.append(row)
    if out is not None:
        out.write_text(json.dumps(rows, indent=1) + "\n")


@app.command("gpu-check")
def gpu_check(
    out: Annotated[Path, typer.Option(help="Directory for gpu_check.jsonl and .md.")],
    artifacts: ArtifactsOption = DEFAULT_ARTIFACTS,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="CPU, tiny sizes, seconds (checks the script).")
    ] = False,
    skip_gateway: Annotated[
        bool, typer.Option("--skip-gateway", help="The model alone only.")
    ] = False,
) -> None:
    """Measure the torchscript path on a CUDA device, one JSON line per figure.

    bench/gpu.sh runs the same check on a host where cnnserve is not installed.
    """
    import shlex

    with user_errors(), needs_extra("torchscript", "cnnserve gpu-check"):
        from cnnserve.bench.gpu_check import GpuCheckError, run_check

        command = " ".join(["cnnserve gpu-check", *(shlex.quote(a) for a in sys.argv[2:])])
        try:
            run_check(out, artifacts, dry_run, skip_gateway, command)
        except GpuCheckError as exc:
            raise UsageError(str(exc)) from None


def _exported(artifacts: Path, artifact: str) -> Path:
    """``artifacts``, resolved, once it holds ``artifact``: a missing export is one line
    before a gateway is started, not a traceback from inside the tool."""
    if not (artifacts / artifact).is_file():
        raise UsageError(
            f"{artifact} not in {artifacts}: export the models first (make export) or give "
            "--artifacts"
        )
    return artifacts.resolve()


ArtifactFormatName = Literal["torchscript", "onnx"]
ModelStoreOption = Annotated[
    Path | None,
    typer.Option(help="TorchServe model store. Default: settings.model_store_dir (model_store)."),
]


@app.command()
def archive(
    repository: Annotated[
        Path | None,
        typer.Option(help="Model repository to archive. Default: settings.model_repository."),
    ] = None,
    model_store: ModelStoreOption = None,
    artifact_format: Annotated[
        ArtifactFormatName | None,
        typer.Option(
            "--format",
            help="Artifact to serve where a model's config.yaml names none. Default: torchscript.",
        ),
    ] = None,
    half: Annotated[
        bool | None, typer.Option("--half/--no-half", help="fp16 on GPU (TorchScript only).")
    ] = None,
) -> None:
    """Build a TorchServe archive of every served version of the repository's models.

    One <name>.<version>.mar per version, into the model store (the gateway does this itself
    for the versions it loads; this builds a store TorchServe serves from its start).
    """
    settings = read_settings()
    with user_errors(), needs_extra("torchserve", "cnnserve archive"):
        from cnnserve.torchserve_engine.archive import archive_repository

        archives = archive_repository(
            repository or settings.model_repository,
            model_store or settings.model_store_dir,
            settings,
            artifact_format,
            half,
        )
    for built in archives:
        typer.echo(f"{built.model} version {built.version}: {built.path} (from {built.artifact})")


torchserve_app = typer.Typer(
    help="Start, stop and inspect TorchServe serving the archived models.",
    no_args_is_help=True,
)
app.add_typer(torchserve_app, name="torchserve")


@torchserve_app.command("start")
def torchserve_start(
    model_store: ModelStoreOption = None,
    host: Annotated[
        str | None, typer.Option(help="Address every TorchServe port binds. Default: 127.0.0.1.")
    ] = None,
    token_auth: Annotated[
        bool | None,
        typer.Option(
            "--token-auth/--no-token-auth",
            help="Token authorization (default on); turn off for local development only.",
        ),
    ] = None,
    timeout_s: Annotated[
        float | None, typer.Option(help="Seconds to wait for READY workers. Default: 180.")
    ] = None,
) -> None:
    """Start TorchServe in the background; return once every model has a READY worker.

    With token authorization, a detached process renews its keys before they expire until
    TorchServe stops (``torchserve_token_renew_fraction``; 0 turns it off)."""
    overrides: dict[str, Any] = {
        "torchserve_host": host,
        "torchserve_token_auth": token_auth,
        "torchserve_start_timeout_s": timeout_s,
    }
    settings = read_settings({key: value for key, value in overrides.items() if value is not None})
    with user_errors(), needs_extra("torchserve", "cnnserve torchserve"):
        from cnnserve.torchserve_engine.process import start
        from cnnserve.torchserve_engine.renewer import spawn

        info = start(settings, model_store)
        # Nothing else renews the keys of a server used without a gateway (curl).
        renewer = spawn(info, settings.torchserve_token_renew_fraction)
    registered = ", ".join(info.models) or "no model yet (a gateway registers what it loads)"
    typer.echo(f"TorchServe ready (pid {info.pid}): {registered}")
    typer.echo(f"  REST inference  {info.inference_url}/predictions/<model>")
    typer.echo(f"  gRPC inference  {info.grpc_target}")
    typer.echo(f"  metrics         {info.metrics_url}/metrics")
    typer.echo(f"  key file        {info.key_file or 'none (token authorization is off)'}")
    if info.key_file is not None:
        renewal = f"by pid {renewer}" if renewer is not None else "off (renew fraction 0)"
        typer.echo(f"  key renewal     {renewal}")
    typer.echo(f"  logs            {info.run_dir / 'logs'}")


@torchserve_app.command("stop")
def torchserve_stop(model_store: ModelStoreOption = None) -> None:
    """Stop TorchServe and its workers (waits until they are gone)."""
    with user_errors(), needs_extra("torchserve", "cnnserve torchserve"):
        from cnnserve.torchserve_engine.process import stop

        stopped = stop(model_store or read_settings().model_store_dir)
    typer.echo("TorchServe stopped" if stopped else "TorchServe was not running")


@torchserve_app.command("status")
def torchserve_status(model_store: ModelStoreOption = None) -> None:
    """Show whether TorchServe runs and its workers' states.

    Exit 0 when every model has a READY worker, 1 when TorchServe does not run, 3 when it runs
    but some model is not ready yet (so the command can serve as a readiness probe).
    """
    with user_errors(), needs_extra("torchserve", "cnnserve torchserve"):
        from cnnserve.torchserve_engine.process import status

        found = status(model_store or read_settings().model_store_dir)
    if not found.running or found.info is None:
        typer.echo("TorchServe is not running")
        raise typer.Exit(1)
    typer.echo(f"TorchServe is running (pid {found.info.pid}) at {found.info.inference_url}")
    if found.info.key_file is not None:
        renewer = found.renewer_pid
        # None: renewal off, the renewer killed, or a server started without this command
        # (the container's entry point), whose holder renews its keys.
        renewal = f"by pid {renewer}" if renewer is not None else "no renewer of its own"
        typer.echo(f"  key renewal     {renewal}")
    for model, states in found.workers.items():
        typer.echo(f"  {model}: {', '.join(states) or 'no workers'}")
    not_ready = sorted(model for model, states in found.workers.items() if "READY" not in states)
    if not found.workers or not_ready:
        typer.echo(f"not ready: {', '.join(not_ready) or 'no models registered'}")
        raise typer.Exit(3)


SECRETS_NOTE = (
    f"Secrets have no flag, as a command line shows in the process list: "
    f"{', '.join('CNNSERVE_' + name.upper() for name in secret_names())} only."
)


@app.command(epilog=SECRETS_NOTE)
@with_setting_flags
def serve(flags: dict[str, Any]) -> None:
    """Run the gateway (gRPC, HTTP, metrics) until SIGTERM/Ctrl-C, then drain and exit.

    Every setting is a flag here and a CNNSERVE_<NAME> variable; a flag wins over the
    variable, the variable over the default (`cnnserve config` shows which applies).
    """
    from cnnserve.logs import setup_logging

    settings = read_settings(flags)
    # log_level and log_format; the processes serve may spawn set theirs up the same way.
    setup_logging(settings.log_level, settings.log_format)
    with user_errors(), needs_extra("gateway", "cnnserve serve"):
        from cnnserve.gateway.server import serve_forever

        _default_repository(settings)
        with _listen_errors():
            serve_forever(settings)


@contextmanager
def _listen_errors() -> Iterator[None]:
    """A port the gateway cannot listen on (taken, privileged, an address not of this host)
    as one line; the gateway has stopped cleanly by then."""
    advice = "give another --grpc-port, --http-port or --metrics-port, or stop what uses it"
    try:
        yield
    except OSError as exc:
        if exc.errno not in (errno.EADDRINUSE, errno.EACCES, errno.EADDRNOTAVAIL):
            raise
        typer.echo(f"error: {exc.strerror}: {advice}", err=True)
        raise typer.Exit(2) from None
    except RuntimeError as exc:
        # What grpc raises when it cannot bind a port, with no errno to tell why.
        if not str(exc).startswith("Failed to bind to address"):
            raise
        typer.echo(f"error: {str(exc).partition(';')[0]}: {advice}", err=True)
        raise typer.Exit(2) from None


@app.command(epilog=SECRETS_NOTE)
@with_setting_flags
def config(
    flags: dict[str, Any],
    as_json: Annotated[
        bool, typer.Option("--json", help="One JSON object: each setting's value and source.")
    ] = False,
) -> None:
    """Show the settings `cnnserve serve` would run with, and where each came from.

    Takes the same flags as serve. Sources: default, environment (CNNSERVE_<NAME>) or flag;
    secrets are shown as set or unset, never their value.
    """
    import os

    from cnnserve.setting_flags import flag, shown, source_of, variable

    settings = read_settings(flags)
    secrets = set(secret_names())
    rows = []
    for name in type(settings).model_fields:
        value = getattr(settings, name)
        if name in secrets:
            value = "unset" if value is None else "set"
        source = source_of(name, flags, os.environ)
        origin = {"flag": flag(name), "environment": variable(name), "default": None}[source]
        rows.append((name, value, source, origin))
    if as_json:
        document = {
            name: {"value": shown(value) if isinstance(value, Path) else value, "source": source}
            | ({"from": origin} if origin else {})
            for name, value, source, origin in rows
        }
        typer.echo(json.dumps(document, indent=2, default=str))
        return
    width = max(len(name) for name, *_ in rows)
    for name, value, source, origin in rows:
        typer.echo(f"{name:<{width}}  {shown(value)}  ({source}{f' {origin}' if origin else ''})")


def _default_repository(settings: Settings) -> None:
    """Make the default model repository with the two demo models when it does not exist
    yet, so a fresh install serves without an export step. A repository given on purpose
    (flag or variable) is never created: a typo should fail, not serve the demos."""
    import logging

    root = settings.model_repository
    if "model_repository" in settings.model_fields_set or root.exists():
        return
    log = logging.getLogger(__name__)
    log.info("%s does not exist: exporting the demo models into it", root)
    with needs_extra("export", f"making the default model repository {root}"):
        from cnnserve.export.repository import ensure_default_repository

        added = ensure_default_repository(root)
    for version in added:
        log.info("%s version %d → %s", version.name, version.version, version.folder)


@app.command()
def predict(
    images: Annotated[list[Path], typer.Argument(help="PNG/JPEG files.")],
    model: Annotated[str, typer.Option(help="convnet (labels) or fcn (mask PNGs).")] = "convnet",
    http: Annotated[bool, typer.Option("--http", help="Use REST instead of gRPC.")] = False,
    host: Annotated[str, typer.Option(help="Gateway address.")] = "127.0.0.1",
    port: Annotated[
        int | None, typer.Option(help="Gateway port. Default: settings' gRPC or HTTP port.")
    ] = None,
    out: Annotated[
        Path | None, typer.Option(help="fcn: directory for masks. Default: beside each image.")
    ] = None,
    as_json: Annotated[
        bool,
        typer.Option(
            "--json",
            help="Print one JSON document: per image its label and top-k (convnet) or its "
            "mask's path, size and pixels per class (fcn).",
        ),
    ] = False,
    top_k: Annotated[
        int, typer.Option(min=1, help="convnet: the K most probable labels of each image.")
    ] = 1,
    timeout_s: Annotated[
        float | None, typer.Option(min=0, help="Seconds each request may take. Default: none.")
    ] = None,
    tls: Annotated[
        bool, typer.Option("--tls", help="Use TLS (implied by --ca-file or --cert-file).")
    ] = False,
    ca_file: Annotated[
        Path | None,
        typer.Option(help="PEM CA that signed the gateway's certificate. Default: system CAs."),
    ] = None,
    cert_file: Annotated[
        Path | None, typer.Option(help="PEM client certificate, for mutual TLS (with --key-file).")
    ] = None,
    key_file: Annotated[Path | None, typer.Option(help="PEM private key of --cert-file.")] = None,
    api_key: Annotated[
        str | None,
        typer.Option(
            envvar="CNNSERVE_CLIENT_API_KEY",
            show_envvar=True,
            help="API key sent as `authorization: Bearer <key>`; prefer the variable (a flag "
            "shows in the process list).",
        ),
    ] = None,
) -> None:
    """Classify digits (convnet) or write segmentation masks (fcn) through a running gateway.

    Many images go as several requests, each within the model's max_batch_size and the
    gateway's default message size.
    """
    from cnnserve.client.inference import (
        MalformedResponseError,
        ServerError,
        TlsConfig,
        UnreachableError,
        connect,
    )
    from cnnserve.client.predict import classify_files, segment_files
    from cnnserve.models.registry import get_spec
    from cnnserve.models.spec import Task

    with user_errors():
        task = get_spec(model).task
        if task is Task.SEGMENTATION and top_k != 1:
            raise UsageError(f"--top-k ranks labels: it applies to convnet, not {model}")
        missing = [str(path) for path in images if not path.is_file()]
        if missing:
            raise UsageError(f"no such image file: {', '.join(missing)}")
    settings = read_settings()
    port = port or (settings.http_port if http else settings.grpc_port)
    secure = tls or ca_file is not None or cert_file is not None
    results = []
    try:
        tls_config = TlsConfig(ca_file, cert_file, key_file) if secure else None
        with connect(host, port, http=http, tls=tls_config, api_key=api_key) as client:
            found = (
                segment_files(client, images, model, out, timeout_s)
                if task is Task.SEGMENTATION
                else classify_files(client, images, model, top_k, timeout_s)
            )
            for result, line in found:
                if as_json:
                    results.append(result)
                else:
                    typer.echo(line)
    except UnreachableError as exc:
        typer.echo(f"error: {exc}: start one with `make serve` or give --host/--port", err=True)
        raise typer.Exit(2) from None
    except (ServerError, MalformedResponseError, ValueError, OSError) as exc:
        # OSError: an unreadable image, certificate or key file, or one ssl refuses.
        typer.echo(f"error: {error_text(exc)}", err=True)
        raise typer.Exit(2) from None
    if as_json:
        typer.echo(json.dumps({"model": model, "results": results}, indent=2))


def main() -> None:
    """Entry point for ``python -m cnnserve``."""
    sys.exit(app())

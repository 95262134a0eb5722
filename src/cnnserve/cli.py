"""The ``cnnserve`` command line (also ``python -m cnnserve``).

``train`` and ``export`` make the demo weights and the TorchScript/ONNX artifacts;
``archive`` and ``torchserve start|stop|status`` package and run TorchServe; ``serve`` runs
the gateway; ``predict`` calls a running gateway; ``bench`` measures it and writes
docs/benchmarks.md. Each command imports what it needs only when it runs, so ``predict``
and ``--help`` work with cnnserve's core dependencies alone; a command whose extra is not
installed says which one to install (``pip install 'cnnserve[export]'``).

Every expected failure prints one line on stderr and exits with status 2; tracebacks are
kept for real bugs.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

import typer

from cnnserve.errors import needs_extra

if TYPE_CHECKING:
    from cnnserve.settings import Settings

app = typer.Typer(
    help="Serve the tutorial's ConvNet and FCN over the Open Inference Protocol.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

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
    """Build one TorchServe archive, <name>.<version>.mar, per served version of every model
    of the repository into the model store (the gateway does this itself for the versions it
    loads; this builds a store TorchServe serves from its start)."""
    from cnnserve.settings import Settings

    settings = Settings()
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
    from cnnserve.settings import Settings

    overrides: dict[str, Any] = {
        "torchserve_host": host,
        "torchserve_token_auth": token_auth,
        "torchserve_start_timeout_s": timeout_s,
    }
    settings = Settings(**{key: value for key, value in overrides.items() if value is not None})
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
    from cnnserve.settings import Settings

    with user_errors(), needs_extra("torchserve", "cnnserve torchserve"):
        from cnnserve.torchserve_engine.process import stop

        stopped = stop(model_store or Settings().model_store_dir)
    typer.echo("TorchServe stopped" if stopped else "TorchServe was not running")


@torchserve_app.command("status")
def torchserve_status(model_store: ModelStoreOption = None) -> None:
    """Show whether TorchServe runs and its workers' states.

    Exit 0 when every model has a READY worker, 1 when TorchServe does not run, 3 when it runs
    but some model is not ready yet (so the command can serve as a readiness probe).
    """
    from cnnserve.settings import Settings

    with user_errors(), needs_extra("torchserve", "cnnserve torchserve"):
        from cnnserve.torchserve_engine.process import status

        found = status(model_store or Settings().model_store_dir)
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


BackendChoice = Literal["torchserve", "onnxruntime", "torchscript"]
ControlMode = Literal["none", "poll", "explicit"]


@app.command()
def serve(
    backend: Annotated[
        BackendChoice | None,
        typer.Option(help="Where batches run. Default: settings.backend (onnxruntime)."),
    ] = None,
    host: Annotated[str | None, typer.Option(help="Address to bind. Default: 127.0.0.1.")] = None,
    grpc_port: Annotated[int | None, typer.Option(help="OIP gRPC port. Default: 8001.")] = None,
    http_port: Annotated[int | None, typer.Option(help="OIP REST port. Default: 8000.")] = None,
    metrics_port: Annotated[
        int | None, typer.Option(help="Prometheus metrics port. Default: 8002.")
    ] = None,
    tls_cert: Annotated[
        Path | None,
        typer.Option(
            help="PEM server certificate: TLS on the gRPC and HTTP ports (with --tls-key)."
        ),
    ] = None,
    tls_key: Annotated[Path | None, typer.Option(help="PEM private key of --tls-cert.")] = None,
    tls_client_ca: Annotated[
        Path | None,
        typer.Option(help="PEM CA: mutual TLS, clients need a certificate it signed."),
    ] = None,
    api_keys_file: Annotated[
        Path | None,
        typer.Option(
            help="File of accepted API keys, one per line: calls need `authorization: Bearer "
            "<key>` (health, the web page and /docs stay open). A single key: CNNSERVE_API_KEY."
        ),
    ] = None,
    model_repository: Annotated[
        Path | None,
        typer.Option(
            help="Model repository to serve. Default: ./model_repository, made with the two "
            "demo models when it does not exist."
        ),
    ] = None,
    model_control_mode: Annotated[
        ControlMode | None,
        typer.Option(
            help="none: load every model at start; poll: also follow the repository's changes; "
            "explicit: load --load-model ones, then on request. Default: none."
        ),
    ] = None,
    load_model: Annotated[
        list[str] | None,
        typer.Option(help="Explicit mode: a model to load at start (repeatable; '*': all)."),
    ] = None,
) -> None:
    """Run the gateway (gRPC, HTTP, metrics) until SIGTERM/Ctrl-C, then drain and exit.

    Flags override the CNNSERVE_* environment; every other setting comes from there.
    """
    from pydantic import ValidationError

    from cnnserve.logs import setup_logging
    from cnnserve.settings import Settings

    overrides: dict[str, Any] = {
        "backend": backend,
        "host": host,
        "grpc_port": grpc_port,
        "http_port": http_port,
        "metrics_port": metrics_port,
        "tls_cert_file": tls_cert,
        "tls_key_file": tls_key,
        "tls_client_ca_file": tls_client_ca,
        "api_keys_file": api_keys_file,
        "model_repository": model_repository,
        "model_control_mode": model_control_mode,
        "load_models": load_model,
    }
    try:
        settings = Settings(**{key: value for key, value in overrides.items() if value is not None})
    except ValidationError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    setup_logging(settings.log_level, settings.log_format)
    with user_errors(), needs_extra("gateway", "cnnserve serve"):
        from cnnserve.gateway.server import serve_forever

        _default_repository(settings)
        serve_forever(settings)


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
    images: Annotated[list[Path], typer.Argument(help="PNG/JPEG files.", exists=True)],
    model: Annotated[str, typer.Option(help="convnet (labels) or fcn (mask PNGs).")] = "convnet",
    http: Annotated[bool, typer.Option("--http", help="Use REST instead of gRPC.")] = False,
    host: Annotated[str, typer.Option(help="Gateway address.")] = "127.0.0.1",
    port: Annotated[
        int | None, typer.Option(help="Gateway port. Default: settings' gRPC or HTTP port.")
    ] = None,
    out: Annotated[
        Path | None, typer.Option(help="fcn: directory for masks. Default: beside each image.")
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
    """Classify digits (convnet) or write segmentation masks (fcn) through a running gateway."""
    from cnnserve.client.inference import ServerError, TlsConfig, connect
    from cnnserve.client.predict import classify_files, segment_files
    from cnnserve.models.registry import get_spec
    from cnnserve.models.spec import Task
    from cnnserve.settings import Settings

    with user_errors():
        task = get_spec(model).task
    settings = Settings()
    port = port or (settings.http_port if http else settings.grpc_port)
    secure = tls or ca_file is not None or cert_file is not None
    try:
        tls_config = TlsConfig(ca_file, cert_file, key_file) if secure else None
    except ValueError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    with connect(host, port, http=http, tls=tls_config, api_key=api_key) as client:
        try:
            lines = (
                segment_files(client, images, model, out)
                if task is Task.SEGMENTATION
                else classify_files(client, images, model)
            )
            for line in lines:
                typer.echo(line)
        except ServerError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(2) from None


def main() -> None:
    """Entry point for ``python -m cnnserve``."""
    sys.exit(app())

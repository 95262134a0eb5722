"""All of cnnserve's settings in one place: environment ``CNNSERVE_<FIELD>``, flags override.

Units are part of every name (``_ms``, ``_bytes``, ``_s``) so a value is never ambiguous.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

BackendName = Literal["torchserve", "onnxruntime", "torchscript"]


class Settings(BaseSettings):
    """cnnserve's configuration; each field documents its meaning and default."""

    # hide_input_in_errors: a validation error must not echo the environment (API keys).
    model_config = SettingsConfigDict(
        env_prefix="CNNSERVE_", extra="ignore", hide_input_in_errors=True
    )

    # --- the gateway's listeners (Triton's ports) ---
    host: str = Field("127.0.0.1", description="Address the gateway binds; 0.0.0.0 in containers.")
    http_port: int = Field(8000, description="Open Inference Protocol REST port.")
    grpc_port: int = Field(8001, description="Open Inference Protocol gRPC port.")
    metrics_port: int = Field(8002, description="Prometheus metrics port.")
    gpu_metrics: bool = Field(
        True,
        description="Export each GPU's utilisation and memory on the metrics port when NVML "
        "finds one (needs cnnserve[gpu-metrics]); off by itself without NVML or a GPU.",
    )

    # --- where models come from and how they run ---
    backend: BackendName = Field(
        "onnxruntime", description="Inference backend: torchserve, onnxruntime or torchscript."
    )
    model_repository: Path = Field(
        Path("model_repository"),
        description="The model repository the gateway serves: <model>/config.yaml and "
        "<model>/<version>/{model.pt,model.onnx,export.json} (`cnnserve export --repository` "
        "writes them). Default: model_repository in the working directory, made with the two "
        "demo models by `cnnserve serve` when it does not exist yet.",
    )
    model_control_mode: Literal["none", "poll", "explicit"] = Field(
        "none",
        description="How models come and go, as Triton's: none: every model of the repository "
        "is loaded at start; poll: also re-read the repository every "
        "repository_poll_interval_s (new models and versions load, removed ones drain and "
        "unload, changed ones reload); explicit: only load_models at start, then only what "
        "the repository API loads and unloads.",
    )
    repository_poll_interval_s: float = Field(
        15.0, gt=0, description="Seconds between two reads of the repository in poll mode."
    )
    load_models: list[str] = Field(
        default_factory=list,
        description="Explicit mode: the models loaded at start (the flag repeats; the "
        'variable is a JSON list, e.g. ["convnet"]); "*" loads every model.',
    )
    model_store_dir: Path = Field(
        Path("model_store"),
        description="TorchServe's model store: one archive per model version (<name>.<N>.mar, "
        "registered when TorchServe starts) and its run directory; where the gateway archives "
        "the versions it registers (see torchserve_model_stores).",
    )
    device: str | None = Field(
        None,
        description="Device for in-process backends, e.g. cuda:0 or cpu; default: GPU if present.",
    )
    half_precision: bool = Field(False, description="Run fp16 on GPU (torchscript backend only).")
    inference_threads: int = Field(
        1,
        ge=0,
        description="Threads one batch may use on a CPU (ONNX Runtime's intra-op threads; "
        "torch.set_num_threads for torchscript and in TorchServe's workers). Default 1: one "
        "thread per batch, the other cores left to the event loop and gRPC; 0: the library's "
        "default, one per core.",
    )
    channels_last: bool = Field(
        True, description="torchscript backend: run the convolutions in the NHWC memory layout."
    )
    device_preprocess: bool = Field(
        True,
        description="torchscript backend: UINT8 pixel and image inputs reach the model's device "
        "as uint8 and are normalized there (on a GPU: 4× less to copy, arithmetic off the "
        "CPU) instead of at the edge; results are identical.",
    )
    pinned_memory: bool = Field(
        True,
        description="torchscript backend on CUDA: stage batches in page-locked host memory so "
        "the copy to the GPU is asynchronous; ignored on a CPU.",
    )
    cuda_graph_batch_sizes: list[int] = Field(
        default_factory=list,
        description="torchscript backend on CUDA: batch-size buckets replayed as CUDA graphs, "
        "e.g. [1,2,4,8,16,32]; a batch is padded up to the next bucket, larger ones run "
        "eagerly; empty: off; ignored on a CPU.",
    )

    gateway_processes: int = Field(
        1,
        ge=1,
        description="Gateway processes sharing the gRPC and HTTP ports (SO_REUSEPORT; the "
        "ports must be fixed): the RPC work spreads over more cores. With shared_batcher they "
        "feed one batching process; without, each has its own batchers and backend and batches "
        "only its share of the traffic. The metrics port serves all of them, summed. Default "
        "1: one process.",
    )
    shared_batcher: bool = Field(
        True,
        description="With gateway_processes > 1: one batching process owns every model's "
        "batcher and the backend (models loaded once) and the gateway processes are frontends "
        "feeding it over local Unix sockets, so batches stay as full as one process would form "
        "them. False: every process is a whole gateway with its own batchers and backend.",
    )
    event_loop: Literal["uvloop", "asyncio"] = Field(
        "uvloop",
        description="The gateway's event loop: uvloop (libuv-based; the default) or asyncio's "
        "standard one.",
    )

    # --- dynamic batching, per model version (and per input size for the FCN); a model's
    # config.yaml (batching:) overrides max_batch_size, max_batch_delay_ms, max_queue_size ---
    max_batch_size: int = Field(
        32,
        ge=1,
        description="Largest batch, in items, the batcher sends to the backend (a model's "
        "config.yaml may set its own).",
    )
    max_batch_delay_ms: float = Field(
        2.0,
        ge=0,
        description="Milliseconds a partial batch may wait, from its oldest request, for more "
        "requests (adaptive_batch_delay can send it sooner); 0: no wait, though what queued "
        "while the model was busy still goes as one batch.",
    )
    adaptive_batch_delay: bool = Field(
        True,
        description="Send a partial batch at once when every caller seen in the last 0.25–0.5 s "
        "is already queued, as waiting could only add latency (a lone caller never waits); "
        "off: a partial batch always waits max_batch_delay_ms for its oldest request.",
    )
    max_queue_size: int = Field(
        512,
        ge=1,
        description="Items queued per model version before new requests get "
        "RESOURCE_EXHAUSTED (a model's config.yaml may set its own).",
    )

    # --- limits on what one request may carry ---
    max_items_per_request: int = Field(256, ge=1, description="Images/tensor rows in one request.")
    max_message_bytes: int = Field(
        20 * 1024 * 1024,
        ge=1024,
        description="Largest gRPC message or HTTP body accepted. Default 20 MiB: the largest "
        "tensor request max_request_bytes accepts, six 512×512 FCN items as raw FP32 (18 MiB), "
        "with room to spare. Parsing a message holds Python's GIL whatever thread does it "
        "(~12 ms per MiB of tiny repeated elements), so this bounds the event loop's longest "
        "stall too.",
    )
    max_image_pixels: int = Field(
        4096 * 4096,
        ge=49,
        description="Largest encoded image (W×H) decoded; checked before decoding.",
    )
    # --- memory: what requests may hold in the gateway at once, in bytes, reserved from image
    # headers and tensor shapes before anything is decoded or allocated (docs/reliability.md,
    # "Memory budgets") ---
    decode_threads: int = Field(
        2,
        ge=1,
        description="Worker threads that decode images and large messages and prepare big "
        "arrays, off the event loop; at most this many decodes hold their working memory at "
        "once.",
    )
    decode_processes: int = Field(
        2,
        ge=0,
        description="Processes that decode the images of a batch for the in-process backends "
        "(onnxruntime, torchscript), beside the gateway's event loop rather than under its "
        "interpreter lock: one round trip per batch (a batch of 8 images or more is shared "
        "among the processes). Default 2: the default repository's two models decode at once, "
        "or one model's batch in two halves, for ~40 MiB of memory each. 0: decode in the "
        "decode_threads pool, in this process. The torchserve backend sends images encoded "
        "to TorchServe, whose workers decode them.",
    )
    max_request_bytes: int = Field(
        256 * 1024 * 1024,
        ge=1024 * 1024,
        description="Bytes of gateway memory one request may take, priced from its image "
        "headers or tensor shape before anything is decoded: its input, its network output "
        "and every copy of them until it is answered. A request priced higher can never "
        "succeed: INVALID_ARGUMENT. Default 256 MiB: six 512×512 FCN images, or the "
        "per-request item limit of ConvNet digits.",
    )
    max_in_flight_bytes: int = Field(
        1024 * 1024 * 1024,
        ge=1024 * 1024,
        description="Bytes of gateway memory all requests in flight may take together (as "
        "max_request_bytes prices them); a request that finds no room is refused at once "
        "with RESOURCE_EXHAUSTED (retry later). Default 1 GiB: with the process itself and "
        "decode_threads decoding, the gateway stays under its 2 GiB container limit.",
    )
    max_batch_model_bytes: int = Field(
        1024 * 1024 * 1024,
        ge=64 * 1024 * 1024,
        description="Working memory a model run in this process (the onnxruntime and "
        "torchscript backends) may take for one batch, priced per pixel from what each "
        "network was measured to take on each runtime; a larger batch runs in parts, and an "
        "item that alone is over it is refused (INVALID_ARGUMENT). Host memory only: a model "
        "on a GPU runs its batches whole. Default 1 GiB: one "
        "512×512 FCN image on ONNX Runtime, two on TorchScript; with max_in_flight_bytes, "
        "cnnserve serve --backend onnxruntime stays under 2 GiB. The torchserve backend "
        "ignores it (the model's memory is in TorchServe's pods).",
    )
    default_timeout_ms: float | None = Field(
        None, description="Deadline applied to requests that carry none; unset means no deadline."
    )
    drain_grace_s: float = Field(
        30.0, ge=0, description="On SIGTERM, how long in-flight requests get to finish."
    )

    # --- slow, silent and greedy clients: what one connection may hold, and for how long ---
    grpc_max_concurrent_streams: int = Field(
        256,
        ge=1,
        description="gRPC calls one client connection may have open at once (HTTP/2 "
        "MAX_CONCURRENT_STREAMS); a client's further calls wait on its side for one to end.",
    )
    grpc_keepalive_time_s: float = Field(
        60.0,
        gt=0,
        description="Seconds without traffic after which the gateway pings a gRPC connection; "
        "one that does not answer within grpc_keepalive_timeout_s is closed and its calls "
        "cancelled (a client gone without a word holds nothing). Clients may ping every 10 s "
        "at most, with or without calls open; faster pings close the connection.",
    )
    grpc_keepalive_timeout_s: float = Field(
        20.0, gt=0, description="Seconds the gateway waits for a keepalive ping's answer."
    )
    grpc_max_connection_idle_s: float = Field(
        600.0,
        gt=0,
        description="A gRPC connection with no call for this many seconds is closed (GOAWAY; "
        "clients reconnect transparently).",
    )
    grpc_max_connection_age_s: float = Field(
        3600.0,
        gt=0,
        description="A gRPC connection is asked to go away (GOAWAY) after this many seconds, so "
        "clients re-resolve and spread over replicas added since; calls open then get "
        "grpc_max_connection_age_grace_s more to finish before the connection is closed.",
    )
    grpc_max_connection_age_grace_s: float = Field(
        300.0,
        ge=0,
        description="Seconds calls still open on a connection past grpc_max_connection_age_s "
        "(a long ModelStreamInfer) get before they are cut.",
    )
    http_max_connections: int = Field(
        1000,
        ge=1,
        description="Open HTTP connections; a connection past it is answered 503 (Connection: "
        "close) and closed before anything is read.",
    )
    http_header_timeout_s: float = Field(
        10.0,
        gt=0,
        description="Seconds a client has to send a request's line and headers, from the "
        "connection's start or the request's first byte; then it is answered 408 and the "
        "connection closed.",
    )
    http_body_timeout_s: float = Field(
        30.0,
        gt=0,
        description="Seconds a client has to send a request's whole body once its headers are "
        "in; then the request is answered 408 and the connection closed (a 20 MiB body in "
        "30 s needs about 6 Mbit/s).",
    )

    # --- who may call the gateway (every field optional: off by default) ---
    tls_cert_file: Path | None = Field(
        None,
        description="PEM server certificate (chain) for TLS on the gRPC and HTTP ports; set "
        "with tls_key_file. Unset: plaintext. The metrics port stays plaintext.",
    )
    tls_key_file: Path | None = Field(None, description="PEM private key of tls_cert_file.")
    tls_client_ca_file: Path | None = Field(
        None,
        description="PEM CA bundle; when set (with TLS on), clients must present a certificate "
        "it signed (mutual TLS), others are refused during the handshake.",
    )
    api_key: SecretStr | None = Field(
        None,
        description="API key callers send as `authorization: Bearer <key>` (gRPC metadata or "
        "HTTP header). Health endpoints and metrics stay open. Never logged.",
    )
    api_keys_file: Path | None = Field(
        None,
        description="File of accepted API keys, one per line (# comments and blank lines "
        "ignored), read at start; combines with api_key. Lets keys rotate one at a time.",
    )

    # --- logs and traces (docs/observability.md) ---
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        "INFO", description="Least severe log level written: DEBUG, INFO, WARNING or ERROR."
    )
    log_format: Literal["text", "json"] = Field(
        "text",
        description="text: one line per record, '<time> <LEVEL> <logger>: <message>'; json: "
        "one JSON object per line (time, level, logger, message, the request's fields, an "
        "exception as one field), for a log collector.",
    )
    access_log: bool = Field(
        False,
        description="One record per HTTP request and gRPC call (logger cnnserve.access): "
        "request id, model, version, status, items, latency, queue time and batch size. "
        "Off for `cnnserve serve`; the container images turn it on.",
    )
    tracing_otlp_endpoint: str | None = Field(
        None,
        description="OpenTelemetry collector the gateway exports its spans to over OTLP/gRPC, "
        "e.g. http://jaeger:4317 (needs cnnserve[tracing]). Unset: no tracing at all.",
    )
    tracing_service_name: str = Field(
        "cnnserve", description="service.name of the exported spans (how Jaeger lists them)."
    )
    tracing_sample_ratio: float = Field(
        1.0,
        ge=0,
        le=1,
        description="Share of traces started here that are recorded; a caller's traceparent "
        "decides for its own trace (parent-based sampling).",
    )

    # --- TorchServe, the engine behind the torchserve backend ---
    torchserve_host: str = Field(
        "127.0.0.1", description="Address TorchServe binds and is reached at."
    )
    torchserve_inference_port: int = Field(8080, description="TorchServe REST inference port.")
    torchserve_management_port: int = Field(
        8081, description="TorchServe management port (never published)."
    )
    torchserve_metrics_port: int = Field(8082, description="TorchServe metrics port.")
    torchserve_grpc_inference_port: int = Field(7070, description="TorchServe gRPC inference port.")
    torchserve_grpc_management_port: int = Field(
        7071, description="TorchServe gRPC management port."
    )
    torchserve_grpc_target: str | None = Field(
        None,
        description="gRPC target the gateway calls, e.g. dns:///torchserve:7070 to spread over "
        "every replica; default: torchserve_host:torchserve_grpc_inference_port.",
    )
    torchserve_token_auth: bool = Field(
        True, description="TorchServe token authorization; turn off only for local development."
    )
    torchserve_key_file: Path | None = Field(
        None,
        description="TorchServe's key_file.json; default: the one in the model store's run dir.",
    )
    torchserve_key_dir: Path | None = Field(
        None,
        description="Directory where every TorchServe replica publishes its inference key as "
        "<ip>_<port>.json, named after the address the gateway reaches it at (a volume shared "
        "by the replicas and the gateway); the gateway looks each replica's key up there. "
        "Unset: one key for every address, from torchserve_key_file.",
    )
    torchserve_resolve_interval_s: float = Field(
        5.0,
        gt=0,
        description="How often the gateway re-resolves a dns:/// TorchServe target, so "
        "replicas added or removed (scale-out) join or leave the rotation.",
    )
    torchserve_artifact_format: Literal["torchscript", "onnx"] = Field(
        "torchscript",
        description="Which exported artifact the TorchServe archives carry, for a model whose "
        "config.yaml names no artifact_format.",
    )
    torchserve_registration: bool = Field(
        True,
        description="Register each version the gateway loads with TorchServe (archived into "
        "the model store of every TorchServe in torchserve_model_stores, then registered "
        "through its loopback-only management API) and unregister it on unload. Off: "
        "TorchServe is out of the gateway's reach (another container) and serves the archives "
        "it was started with.",
    )
    torchserve_model_stores: list[Path] = Field(
        default_factory=list,
        description="Model stores of the TorchServes on this machine the gateway registers "
        "versions with, each started by `cnnserve torchserve start` (one per replica behind "
        'torchserve_grpc_target; the variable is a JSON list, e.g. ["/srv/a", "/srv/b"]). '
        "Empty: model_store_dir alone.",
    )
    torchserve_start_timeout_s: float = Field(
        180.0, ge=1, description="How long `cnnserve torchserve start` waits for READY workers."
    )
    torchserve_workers_per_model: int = Field(
        1, ge=1, description="TorchServe worker processes per model (each holds its own copy)."
    )
    torchserve_batch_size: int = Field(
        1,
        ge=1,
        description="TorchServe's own batch size (batchSize in each archive's "
        "model-config.yaml). Default 1: the gateway sends whole batches already, so TorchServe "
        "runs each call as it comes and its batch delay never adds to the gateway's; a larger "
        "value is for calling TorchServe's REST API directly.",
    )
    torchserve_max_batch_delay_ms: int = Field(
        5,
        ge=0,
        description="Milliseconds TorchServe waits to fill a batch (maxBatchDelay; only with "
        "torchserve_batch_size > 1).",
    )
    torchserve_response_timeout_s: int = Field(
        120,
        ge=1,
        description="Seconds TorchServe gives a worker to answer one batch before it restarts "
        "that worker (TorchServe's default_response_timeout in config.properties and "
        "responseTimeout in each archive's model-config.yaml). Applies where the archives are "
        "built and TorchServe is started; the gateway's own wait is torchserve_call_timeout_s.",
    )
    torchserve_call_timeout_s: float = Field(
        120.0,
        gt=0,
        description="Seconds the gateway waits for TorchServe to answer one batch call (a "
        "retry on another replica included) before the batch's requests fail with "
        "DEADLINE_EXCEEDED. A request whose own deadline (gRPC deadline, OIP timeout or "
        "default_timeout_ms) comes sooner is answered then; the call still runs for the rest "
        "of its batch, and the model's next batch waits for it. Keep it at most "
        "torchserve_response_timeout_s: past that, TorchServe restarts the worker anyway.",
    )
    torchserve_max_message_bytes: int = Field(
        256 * 1024 * 1024,
        ge=6 * 1024 * 1024,
        description="Bytes: TorchServe's request and response size limits (max_request_size, "
        "max_response_size; they bound its gRPC messages too) and the gateway's gRPC message "
        "limit on its calls to TorchServe. Default 256 MiB, room for the largest FCN batch's "
        "answer (32×4×512×512 FP32 scores = 128 MiB); TorchServe's own default is 6.5 MB.",
    )
    torchserve_token_expiration_min: float = Field(
        7 * 24 * 60,
        gt=0,
        description="Minutes each key TorchServe draws stays valid. cnnserve renews the "
        "inference and management keys before they expire (see "
        "torchserve_token_renew_fraction), so this bounds how long a leaked key works, not "
        "how long TorchServe serves.",
    )
    torchserve_token_renew_fraction: float = Field(
        0.25,
        ge=0,
        lt=1,
        description="Renew a TorchServe key once less than this fraction of its lifetime "
        "(torchserve_token_expiration_min) is left: 0.25 renews a one-week key with 42 h to "
        "spare, time for a renewer that was down (a restarting container or gateway) to catch "
        "up. Renewal is checked every second by the TorchServe container's entry point, by "
        "the renewer `cnnserve torchserve start` leaves behind and by a gateway for the "
        "TorchServes of its model stores; the margin must stay above a few "
        "seconds. 0 turns renewal off: keys are then refused once they expire.",
    )
    torchserve_key_refused_exit_s: float = Field(
        90.0,
        ge=0,
        description="Seconds the TorchServe container's entry point lets TorchServe refuse the "
        "inference key it published (checked every 10 s) before it stops TorchServe and exits "
        "1, so the orchestrator restarts the container and TorchServe draws fresh keys: a "
        "replica whose keys expired (renewal broken) heals itself instead of refusing every "
        "call until someone notices. 0: never exit for that (the health check still fails).",
    )
    torchserve_initial_worker_port: int = Field(
        9000,
        ge=1024,
        description="First of the ports (or socket names) TorchServe gives its workers, one "
        "per worker from here on.",
    )

    @field_validator("log_level", mode="before")
    @classmethod
    def _level_in_any_case(cls, value: object) -> object:
        """``debug`` is as clear as ``DEBUG``."""
        return value.upper() if isinstance(value, str) else value

    @model_validator(mode="after")
    def _tls_files_go_together(self) -> Settings:
        """A certificate needs its key (and vice versa); a client CA needs TLS on."""
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("tls_cert_file and tls_key_file must be set together")
        if self.tls_client_ca_file is not None and self.tls_cert_file is None:
            raise ValueError("tls_client_ca_file (mutual TLS) needs tls_cert_file and tls_key_file")
        return self

    @model_validator(mode="after")
    def _load_models_need_explicit_mode(self) -> Settings:
        """Other modes load every model, so naming some would be silently ignored."""
        if self.load_models and self.model_control_mode != "explicit":
            raise ValueError(
                "load_models applies to model_control_mode explicit only (the other modes "
                "load every model of the repository)"
            )
        return self

    @model_validator(mode="after")
    def _one_request_fits_in_flight(self) -> Settings:
        """A request within max_request_bytes must be able to run when nothing else does."""
        if self.max_request_bytes > self.max_in_flight_bytes:
            raise ValueError(
                f"max_request_bytes ({self.max_request_bytes}) is larger than "
                f"max_in_flight_bytes ({self.max_in_flight_bytes})"
            )
        return self

    @property
    def tls_enabled(self) -> bool:
        """Whether the gRPC and HTTP listeners speak TLS."""
        return self.tls_cert_file is not None

    @property
    def grpc_target(self) -> str:
        """The gRPC address of TorchServe's inference API."""
        return (
            self.torchserve_grpc_target
            or f"{self.torchserve_host}:{self.torchserve_grpc_inference_port}"
        )

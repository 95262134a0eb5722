"""Call cnnserve (or any Open Inference Protocol server) from a Python program.

>>> with connect("127.0.0.1", 8001) as client:            # gRPC; http=True for REST
...     client.classify([open("digit.png", "rb").read()])  # [Classification('7', 0.99)]
...     client.segment(open("scene.png", "rb").read())     # H×W uint8 class mask
...     client.infer("convnet", {"pixels": pixels})        # raw tensors in and out

Tensors travel raw on both transports (gRPC ``raw_input_contents``; HTTP binary tensor
extension), encoded by the same codecs the server decodes with.

A gateway with TLS is reached with ``tls=TlsConfig(ca_file=...)`` (plus ``cert_file`` and
``key_file`` for mutual TLS); one with API keys with ``api_key=...``, sent as
``authorization: Bearer <key>`` on every call.
"""

from __future__ import annotations

import contextlib
import dataclasses
import ssl
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Self

import grpc
import httpx
import numpy as np

from cnnserve.protocol import open_inference_pb2 as pb
from cnnserve.protocol import open_inference_pb2_grpc as pb_grpc
from cnnserve.protocol.domain import DATATYPES, InferRequest, InferResponse, RequestedOutput, Tensor
from cnnserve.protocol.errors import CodecError
from cnnserve.protocol.grpc_codec import request_to_proto, response_from_proto
from cnnserve.protocol.http_codec import HEADER_LENGTH, decode_infer_response, encode_infer_request

#: Largest message either side of a call may carry (the server has its own limit).
MAX_MESSAGE_BYTES = 256 * 1024 * 1024


class MalformedResponseError(Exception):
    """The server's answer does not follow the Open Inference Protocol (a server fault)."""


class UnreachableError(Exception):
    """No connection could be made to the address (refused, or a host that cannot be
    resolved or reached); a call that times out is a :class:`ServerError`."""

    def __init__(self, address: str, reason: str) -> None:
        super().__init__(f"no gateway at {address} ({reason})")
        self.address = address
        self.reason = reason


class ServerError(Exception):
    """The server answered with an error: its status (gRPC code name or HTTP status) and
    message."""

    def __init__(self, status: str, message: str) -> None:
        super().__init__(f"{status}: {message}")
        self.status = status
        self.message = message


@dataclass(frozen=True)
class TlsConfig:
    """How a client speaks TLS: the CA that signed the server's certificate (``None``: the
    system's trust store) and, for mutual TLS, the client's own certificate and key."""

    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None

    def __post_init__(self) -> None:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("a client certificate needs its key: give cert_file and key_file")

    def grpc_credentials(self) -> grpc.ChannelCredentials:
        """Channel credentials for :func:`grpc.secure_channel`."""
        return grpc.ssl_channel_credentials(
            root_certificates=self.ca_file.read_bytes() if self.ca_file else None,
            private_key=self.key_file.read_bytes() if self.key_file else None,
            certificate_chain=self.cert_file.read_bytes() if self.cert_file else None,
        )

    def ssl_context(self) -> ssl.SSLContext:
        """An SSL context for HTTPS (server verified against ``ca_file``)."""
        context = ssl.create_default_context(cafile=self.ca_file)
        if self.cert_file is not None:
            context.load_cert_chain(self.cert_file, self.key_file)
        return context


def bearer(api_key: str) -> str:
    """The ``authorization`` value carrying ``api_key``."""
    return f"Bearer {api_key}"


@dataclass(frozen=True)
class Classification:
    """An image's most probable label and its probability."""

    label: str
    probability: float


def datatype_of(array: np.ndarray) -> str:
    """The Open Inference Protocol datatype of a numpy array (``bytes``/``str`` → BYTES)."""
    if array.dtype.kind in "OSU":
        return "BYTES"
    for name, dtype in DATATYPES.items():
        if dtype == array.dtype:
            return name
    raise ValueError(f"numpy dtype {array.dtype} has no Open Inference Protocol datatype")


def _bytes_tensor(name: str, items: Sequence[bytes]) -> Tensor:
    data = np.empty(len(items), dtype=object)
    data[:] = list(items)
    return Tensor(name, "BYTES", (len(items),), data)


class InferenceClient(ABC):
    """The calls a program makes; :class:`GrpcClient` and :class:`HttpClient` carry them."""

    @abstractmethod
    def infer_request(self, request: InferRequest, timeout_s: float | None = None) -> InferResponse:
        """Send one request as is; raises :class:`ServerError` when the server refuses it."""

    @abstractmethod
    def max_batch_size(self, model: str) -> int:
        """The model's ``max_batch_size`` from its configuration (0: it takes no batch)."""

    @abstractmethod
    def server_ready(self) -> bool:
        """Whether every model is ready (false too when the server cannot be reached)."""

    @abstractmethod
    def close(self) -> None:
        """Close the connection."""

    def infer(
        self,
        model: str,
        inputs: Mapping[str, np.ndarray],
        outputs: Sequence[str | RequestedOutput] | None = None,
        timeout_s: float | None = None,
    ) -> dict[str, np.ndarray]:
        """Named numpy inputs → named numpy outputs (``None``: the model's defaults)."""
        tensors = [
            Tensor(name, datatype_of(array), tuple(array.shape), array)
            for name, array in inputs.items()
        ]
        requested = (
            None
            if outputs is None
            else [o if isinstance(o, RequestedOutput) else RequestedOutput(o) for o in outputs]
        )
        response = self.infer_request(InferRequest(model, tensors, requested), timeout_s)
        return {t.name: t.data for t in response.outputs}

    def classify(
        self, images: Sequence[bytes], model: str = "convnet", timeout_s: float | None = None
    ) -> list[Classification]:
        """PNG/JPEG images → the most probable label of each, with its probability."""
        return [best for best, *_ in self.classify_top(images, 1, model, timeout_s)]

    def classify_top(
        self,
        images: Sequence[bytes],
        k: int,
        model: str = "convnet",
        timeout_s: float | None = None,
    ) -> list[list[Classification]]:
        """PNG/JPEG images → the ``k`` most probable labels of each, most probable first."""
        request = InferRequest(
            model,
            [_bytes_tensor("image", images)],
            [RequestedOutput("probabilities", {"classification": k})],
        )
        result = {t.name: t.data for t in self.infer_request(request, timeout_s).outputs}
        classified = []
        for row in result["probabilities"]:
            ranked = []
            for entry in row:
                # Triton's classification string: "<probability>:<index>:<label>".
                probability, _, label = bytes(entry).decode().split(":", 2)
                ranked.append(Classification(label, float(probability)))
            classified.append(ranked)
        return classified

    def segment(
        self, image: bytes, model: str = "fcn", timeout_s: float | None = None
    ) -> np.ndarray:
        """A PNG/JPEG image → its ``H×W`` uint8 class mask."""
        request = InferRequest(model, [_bytes_tensor("image", [image])], [RequestedOutput("mask")])
        (mask,) = self.infer_request(request, timeout_s).outputs
        masks: np.ndarray = np.asarray(mask.data)
        return masks[0]  # type: ignore[no-any-return]

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()


#: What gRPC's UNAVAILABLE says when no connection was made: every address refused or
#: unreachable, or the name not resolved (a server's own UNAVAILABLE says neither).
_GRPC_UNREACHABLE = ("failed to connect", "errors resolving", "DNS resolution failed")


class GrpcClient(InferenceClient):
    """The Open Inference Protocol over gRPC (``host:port``, default port 8001)."""

    def __init__(
        self, target: str, tls: TlsConfig | None = None, api_key: str | None = None
    ) -> None:
        options = [
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ]
        self._channel = (
            grpc.insecure_channel(target, options=options)
            if tls is None
            else grpc.secure_channel(target, tls.grpc_credentials(), options=options)
        )
        self._target = target
        self._metadata = () if api_key is None else (("authorization", bearer(api_key)),)
        self._stub = pb_grpc.GRPCInferenceServiceStub(self._channel)  # type: ignore[no-untyped-call]

    def infer_request(self, request: InferRequest, timeout_s: float | None = None) -> InferResponse:
        """Send one ModelInfer call."""
        with self._call():
            reply = self._stub.ModelInfer(
                request_to_proto(request), timeout=timeout_s, metadata=self._metadata
            )
        with _server_answer():
            return response_from_proto(reply)

    def max_batch_size(self, model: str) -> int:
        """The ModelConfig call's ``max_batch_size``."""
        with self._call():
            reply = self._stub.ModelConfig(
                pb.ModelConfigRequest(name=model), timeout=30, metadata=self._metadata
            )
        return int(reply.config.max_batch_size)

    @contextlib.contextmanager
    def _call(self) -> Iterator[None]:
        """A failed call as :class:`UnreachableError` when no connection could be made (gRPC
        says so in UNAVAILABLE's details), else as :class:`ServerError`."""
        try:
            yield
        except grpc.RpcError as exc:
            details = exc.details() or ""
            if exc.code() is grpc.StatusCode.UNAVAILABLE and any(
                marker in details for marker in _GRPC_UNREACHABLE
            ):
                refused = "connection refused" in details.lower()
                raise UnreachableError(
                    self._target, "connection refused" if refused else details
                ) from None
            raise ServerError(exc.code().name, details) from None

    def server_ready(self) -> bool:
        """ServerReady, false when the server cannot be reached."""
        try:
            return bool(self._stub.ServerReady(pb.ServerReadyRequest(), timeout=5).ready)
        except grpc.RpcError:
            return False

    def close(self) -> None:
        """Close the channel."""
        self._channel.close()


class HttpClient(InferenceClient):
    """The Open Inference Protocol over HTTP/REST (``http://host:port``, default port 8000)."""

    def __init__(
        self, base_url: str, tls: TlsConfig | None = None, api_key: str | None = None
    ) -> None:
        headers = {} if api_key is None else {"authorization": bearer(api_key)}
        self._address = base_url.partition("://")[2]
        self._http = httpx.Client(
            base_url=base_url,
            timeout=None,
            headers=headers,
            verify=True if tls is None else tls.ssl_context(),
        )

    def infer_request(self, request: InferRequest, timeout_s: float | None = None) -> InferResponse:
        """POST ``/v2/models/{model}[/versions/{v}]/infer`` with binary tensors."""
        if timeout_s is not None:
            # HTTP carries no deadline; the OIP "timeout" parameter (µs) gives the server one.
            parameters = {**request.parameters, "timeout": max(1, round(timeout_s * 1e6))}
            request = dataclasses.replace(request, parameters=parameters)
        body, header_length = encode_infer_request(request)
        version = f"/versions/{request.model_version}" if request.model_version else ""
        with self._call(timeout_s):
            reply = self._http.post(
                f"/v2/models/{request.model_name}{version}/infer",
                content=body,
                headers={HEADER_LENGTH: str(header_length)},
                timeout=timeout_s,
            )
        _refuse_errors(reply)
        header = reply.headers.get(HEADER_LENGTH)
        with _server_answer():
            return decode_infer_response(reply.content, None if header is None else int(header))

    def max_batch_size(self, model: str) -> int:
        """``GET /v2/models/{model}/config``'s ``max_batch_size``."""
        with self._call(30):
            reply = self._http.get(f"/v2/models/{model}/config", timeout=30)
        _refuse_errors(reply)
        with _server_answer():
            try:
                return int(reply.json().get("max_batch_size", 0))
            except (ValueError, AttributeError, TypeError) as exc:
                raise CodecError(f"model configuration is not a JSON object: {exc}") from None

    @contextlib.contextmanager
    def _call(self, timeout_s: float | None) -> Iterator[None]:
        """Raise :class:`UnreachableError` when no connection could be made, and
        :class:`ServerError` for a timeout or an answer other than 200."""
        try:
            yield
        except httpx.TimeoutException:
            raise ServerError("timeout", f"no answer within {timeout_s} s") from None
        except httpx.ConnectError as exc:
            refused = isinstance(exc.__context__, ConnectionRefusedError) or "refused" in str(exc)
            raise UnreachableError(
                self._address, "connection refused" if refused else str(exc)
            ) from None

    def server_ready(self) -> bool:
        """``GET /v2/health/ready``, false when the server cannot be reached."""
        try:
            return self._http.get("/v2/health/ready", timeout=5).status_code == 200
        except httpx.HTTPError:
            return False

    def close(self) -> None:
        """Close the connection pool."""
        self._http.close()


@contextlib.contextmanager
def _server_answer() -> Iterator[None]:
    """Decode the server's answer: a protocol violation in it is the server's fault."""
    try:
        yield
    except CodecError as exc:
        raise MalformedResponseError(f"the server's answer is malformed: {exc}") from exc


def _refuse_errors(reply: httpx.Response) -> None:
    """An answer other than 200 as :class:`ServerError`."""
    if reply.status_code != 200:
        raise ServerError(str(reply.status_code), _error_message(reply))


def _error_message(reply: httpx.Response) -> str:
    try:
        return str(reply.json()["error"])
    except (ValueError, KeyError, TypeError):
        return reply.text


def connect(
    host: str = "127.0.0.1",
    port: int | None = None,
    http: bool = False,
    tls: TlsConfig | None = None,
    api_key: str | None = None,
) -> InferenceClient:
    """A client for the gateway at ``host`` (port default: 8000 HTTP, 8001 gRPC), over TLS
    when ``tls`` is given, sending ``api_key`` when given."""
    if http:
        scheme = "http" if tls is None else "https"
        return HttpClient(f"{scheme}://{host}:{port or 8000}", tls, api_key)
    return GrpcClient(f"{host}:{port or 8001}", tls, api_key)

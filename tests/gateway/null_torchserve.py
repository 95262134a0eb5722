"""A stand-in for TorchServe's gRPC inference API whose every prediction is zeros of the model's
output shape (``N×C`` logits, ``N×C×H×W`` scores), in the handlers' packed format.

A gateway with ``backend=torchserve`` in front of it does all its own work — decoding, batching,
packing, the backend call and the reply — at the cost it has in a deployment, while the model's
own memory and time (TorchServe's pods in a deployment) stay out of the gateway's figures.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import grpc
import numpy as np
from google.protobuf import empty_pb2

from cnnserve.handlers.packing import PACKED_INPUT_NAME, pack, unpack
from cnnserve.models.registry import get_spec
from cnnserve.models.spec import Task
from cnnserve.protocol import torchserve_inference_pb2 as ts_pb
from cnnserve.protocol import torchserve_inference_pb2_grpc as ts_grpc

#: As the gateway's own limit on its TorchServe calls (torchserve_max_message_bytes).
MAX_MESSAGE_BYTES = 256 << 20


class NullTorchServe(ts_grpc.InferenceAPIsServiceServicer):
    """Healthy; answers each packed batch of a demo model with zeros of its output shape."""

    def Ping(  # noqa: N802 (the gRPC method's name)
        self, request: empty_pb2.Empty, context: grpc.ServicerContext
    ) -> ts_pb.TorchServeHealthResponse:
        return ts_pb.TorchServeHealthResponse(health=json.dumps({"status": "Healthy"}))

    def Predictions(  # noqa: N802 (the gRPC method's name)
        self, request: ts_pb.PredictionsRequest, context: grpc.ServicerContext
    ) -> ts_pb.PredictionResponse:
        batch = unpack(request.input[PACKED_INPUT_NAME], ndim=4)
        spec = get_spec(request.model_name)
        shape: tuple[int, ...] = (len(batch), spec.num_classes)
        if spec.task is Task.SEGMENTATION:
            shape += batch.shape[2:]
        zeros = np.zeros(shape, dtype=np.float32)
        return ts_pb.PredictionResponse(prediction=pack(zeros, ndim=None))


@contextmanager
def null_torchserve() -> Iterator[str]:
    """A :class:`NullTorchServe` on a free loopback port, in threads of this process; its
    gRPC target."""
    options = [
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ]
    server = grpc.server(ThreadPoolExecutor(4), options=options)
    ts_grpc.add_InferenceAPIsServiceServicer_to_server(NullTorchServe(), server)  # type: ignore[no-untyped-call]
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        server.stop(grace=None)

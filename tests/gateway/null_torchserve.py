"""A stand-in for TorchServe's gRPC inference API whose every prediction is zeros of the model's
output shape (``N×C`` logits, ``N×C×H×W`` scores), in the handlers' packed format, for float32
batches and image batches alike (an image batch's images are not decoded).

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

from cnnserve.handlers.packing import (
    PACKED_INPUT_NAME,
    is_image_batch,
    pack,
    unpack,
    unpack_images,
)
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
        payload = request.input[PACKED_INPUT_NAME]
        spec = get_spec(request.model_name)
        if is_image_batch(payload):
            images = unpack_images(payload)
            count, size = len(images.images), images.declared_size
            # An FCN batch declares its images' (width, height).
            item_size = (size[1], size[0]) if size is not None else spec.fixed_size
        else:
            batch = unpack(payload, ndim=4)
            count, item_size = len(batch), (batch.shape[2], batch.shape[3])
        shape: tuple[int, ...] = (count, spec.num_classes)
        if spec.task is Task.SEGMENTATION and item_size is not None:
            shape += tuple(item_size)
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

"""Memory budgets: what requests may hold in the gateway, in bytes, reserved before it is spent.

Item counts say little about cost (one 512×512 FCN item costs ~17,000× a ConvNet digit), so
every request is priced in bytes from what it declares — image headers, tensor shapes —
before any image is decoded or array allocated (:func:`request_cost`), and the price is
reserved for as long as the data plane holds the request (:class:`MemoryBudget`):

- a request priced above ``max_request_bytes`` can never succeed here: INVALID_ARGUMENT (not
  RESOURCE_EXHAUSTED, which clients and retry policies treat as worth retrying), naming
  its price and the limit, so the caller splits it;
- a request that fits but finds ``max_in_flight_bytes`` taken by others is refused at once
  with RESOURCE_EXHAUSTED (429): retry later, when they are answered.

The price covers every copy the gateway makes of a request's data, at the most that can be
alive at once (measured: docs/reliability.md, "Memory budgets"): its input from decoded pixels
to the batch sent to the backend, its network output from the backend's answer to the
encoded reply, and the working memory of decoding its largest image.

A model run in this process (the ``onnxruntime`` and ``torchscript`` backends) takes working
memory of its own on top, bounded per batch: :data:`MODEL_WORKING_MEMORY` prices it per pixel
of the batch's items, from measurements of each network on each runtime, and the backend
splits a batch into parts of at most ``max_batch_model_bytes`` (:class:`WorkingMemory`).
"""

from __future__ import annotations

import contextlib
import math
import threading
from collections.abc import Iterator
from dataclasses import dataclass

from cnnserve.errors import InvalidInputError, OverloadedError
from cnnserve.models.imaging import MAX_BYTES_PER_PIXEL
from cnnserve.models.runtime import ArtifactFormat
from cnnserve.models.spec import Architecture, ModelSpec, Task

#: Bytes the gateway may hold, all copies together, per element of a request's network input
#: (``N×3×H×W``): decoded uint8 pixels and their stack, the float32 normalization and its
#: temporaries, the batch, and the backend's encoded request (TorchServe: .npy, protobuf, wire).
INPUT_BYTES_PER_ELEMENT = 24
#: Bytes per element of a request's network output (FP32 ``N×C`` logits or ``N×C×H×W``
#: scores): the backend's answer as received and decoded, the request's rows, the outputs
#: computed from them and their encoded reply.
OUTPUT_BYTES_PER_ELEMENT = 24
#: Copies of one image a decode holds at once: as decoded, and converted to RGB.
DECODE_COPIES = 2


def decode_bytes(pixels: int) -> int:
    """Most working memory decoding one image of ``pixels`` (header size) can take."""
    return pixels * MAX_BYTES_PER_PIXEL * DECODE_COPIES


def request_cost(
    spec: ModelSpec,
    count: int,
    item_shape: tuple[int, ...],
    largest_image_pixels: int = 0,
    feature_elements: int = 0,
) -> int:
    """Bytes a request of ``count`` items of network input ``item_shape`` (``3×H×W``) may
    hold in the gateway; ``largest_image_pixels``: its largest encoded image's header size
    (0 for tensor inputs), decoded one at a time; ``feature_elements``: elements of the
    feature maps it asks for, per item, priced as network output (they travel and are
    copied as it is)."""
    input_elements = 1
    for side in item_shape:
        input_elements *= side
    output_elements = spec.num_classes
    if spec.task is Task.SEGMENTATION:
        output_elements *= input_elements // max(item_shape[0], 1)
    output_elements += feature_elements
    per_item = input_elements * INPUT_BYTES_PER_ELEMENT + output_elements * OUTPUT_BYTES_PER_ELEMENT
    return count * per_item + decode_bytes(largest_image_pixels)


def mib(nbytes: int) -> str:
    """Bytes as MiB, for messages."""
    return f"{nbytes / 2**20:.1f} MiB"


def check_feature_maps(
    count: int, maps: dict[str, tuple[int, ...]], cost: int, max_request_bytes: int
) -> None:
    """Refuse a request for feature maps (``maps``: each one's item shape) priced at
    ``cost`` over ``max_request_bytes``, with a message that says what its maps weigh and
    what to ask for instead (:class:`InvalidInputError`: it can never succeed as it is)."""
    if cost <= max_request_bytes:
        return
    listed = ", ".join(
        f"{name} [{','.join(str(side) for side in (count, *shape))}]"
        for name, shape in maps.items()
    )
    elements = sum(math.prod(shape) for shape in maps.values())
    nbytes = count * elements * 4
    raise InvalidInputError(
        f"the feature maps asked for ({listed}) are {nbytes:,} bytes of FP32; with their "
        f"copies this request would take {cost:,} bytes ({mib(cost)}) of gateway memory, and "
        f"one request may take at most {max_request_bytes:,} bytes ({mib(max_request_bytes)}, "
        "max_request_bytes): ask for fewer images per request, one layer at a time, or send a "
        "smaller image"
    )


class MemoryBudget:
    """The bytes every in-flight request has reserved, against a per-request and a global
    limit; see the module docstring. Thread-safe: a reservation may be made off the loop."""

    def __init__(self, max_request_bytes: int, max_in_flight_bytes: int) -> None:
        self.max_request_bytes = max_request_bytes
        self.max_in_flight_bytes = max_in_flight_bytes
        self._lock = threading.Lock()
        self._in_use = 0

    @property
    def in_use(self) -> int:
        """Bytes reserved right now."""
        return self._in_use

    @contextlib.contextmanager
    def reserve(self, nbytes: int, what: str) -> Iterator[None]:
        """Hold ``nbytes`` for the block, or refuse ``what`` (a request, for the message) at
        once: :class:`InvalidInputError` above the per-request limit, :class:`OverloadedError`
        when the global one has no room left."""
        if nbytes > self.max_request_bytes:
            raise InvalidInputError(
                f"{what} would take {mib(nbytes)} of gateway memory; one request may take "
                f"at most {mib(self.max_request_bytes)} (max_request_bytes): send fewer or "
                "smaller images in each request"
            )
        with self._lock:
            if self._in_use + nbytes > self.max_in_flight_bytes:
                raise OverloadedError(
                    f"the gateway's memory budget is taken ({mib(self._in_use)} of "
                    f"{mib(self.max_in_flight_bytes)} in flight, max_in_flight_bytes); "
                    f"{what} needs {mib(nbytes)}: retry later"
                )
            self._in_use += nbytes
        try:
            yield
        finally:
            with self._lock:
                self._in_use -= nbytes


@dataclass(frozen=True)
class WorkingMemory:
    """What an in-process model's own working memory (activations, convolution workspace,
    ONNX Runtime's arena) takes for one batch, in bytes per pixel of one item's H×W: once per
    batch (workspace sized by one item, reused item after item) and once per item."""

    per_batch: int
    per_item: int

    def batch_bytes(self, count: int, pixels: int) -> int:
        """Bytes a batch of ``count`` items of ``pixels`` each takes."""
        return pixels * (self.per_batch + count * self.per_item)

    def max_items(self, pixels: int, limit: int) -> int:
        """The most items of ``pixels`` each one batch may hold within ``limit`` bytes (0:
        not even one)."""
        room = limit // max(pixels, 1) - self.per_batch
        return max(room // self.per_item, 0)


#: Measured peak RSS growth of one batch, rounded up (tools/memory_probe.py --runners; see
#: docs/reliability.md, "Memory budgets"). ONNX Runtime with its CPU arena on and memory
#: patterns off (models/runtime.py): a 512×512 FCN batch of 1 took +950 MiB, of 2 +1,306,
#: of 4 +2,017, of 8 +2,846; TorchScript 376 MiB an item at any batch size; a ConvNet digit
#: ~0.27 MB on either.
MODEL_WORKING_MEMORY: dict[tuple[ArtifactFormat, Architecture], WorkingMemory] = {
    ("onnx", Architecture.FCN): WorkingMemory(per_batch=2560, per_item=1536),
    ("torchscript", Architecture.FCN): WorkingMemory(per_batch=0, per_item=1536),
    ("onnx", Architecture.CONVNET): WorkingMemory(per_batch=0, per_item=512),
    ("torchscript", Architecture.CONVNET): WorkingMemory(per_batch=0, per_item=512),
}

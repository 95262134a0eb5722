"""What the memory-budget tests and tools/memory_probe.py both send and measure: the images
that cost most memory per byte sent, requests carrying them, and a process's peak RSS."""

from __future__ import annotations

import io
from pathlib import Path

import psutil
from PIL import Image

from cnnserve.protocol import open_inference_pb2 as pb

#: gRPC channel options that take the largest messages either side may send.
BIG_CHANNEL = [
    ("grpc.max_receive_message_length", 1 << 30),
    ("grpc.max_send_message_length", 1 << 30),
]


def png(image: Image.Image) -> bytes:
    """``image`` as the smallest PNG PIL writes."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def transparent_png(side: int) -> bytes:
    """A transparent square with an opaque bar: a ~70 KB file at 4096², 1 GB decoded once."""
    image = Image.new("RGBA", (side, side), (0, 0, 0, 0))
    image.paste((255, 255, 255, 255), (side * 3 // 8, side // 4, side * 5 // 8, side * 3 // 4))
    return png(image)


def image_request(
    model: str, images: list[bytes], outputs: tuple[str, ...] = ()
) -> pb.ModelInferRequest:
    """A ModelInfer request of encoded ``images`` (BYTES ``N×1``), asking for ``outputs``."""
    request = pb.ModelInferRequest(model_name=model)
    tensor = request.inputs.add(name="image", datatype="BYTES", shape=[len(images), 1])
    tensor.contents.bytes_contents.extend(images)
    for name in outputs:
        request.outputs.add(name=name)
    return request


def reset_peak(pid: int) -> int:
    """Restart process ``pid``'s peak RSS count (VmHWM) from now; its RSS now, in bytes."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")
    return int(psutil.Process(pid).memory_info().rss)


def peak_rss(pid: int) -> int:
    """Process ``pid``'s peak RSS (VmHWM) since :func:`reset_peak`, in bytes; 0 once it is
    gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0

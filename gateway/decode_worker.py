"""One batch of encoded images → network input: the work a decode process does.

:func:`prepare_images` is what runs, in a decode process (:class:`.decode_pool.DecodeProcesses`)
or, with ``decode_processes = 0``, in the gateway's decode threads. Run as a program
(``python -m cnnserve.gateway.decode_worker FD``), this module is a decode process: it reads
:class:`ImageJob` objects from the connection on file descriptor ``FD`` and answers each with
:func:`prepare_images`'s result, one round trip per batch, until the gateway closes the
connection. It imports numpy, Pillow and the model specs only — never torch or onnxruntime — so
each process stays small and starts quickly.
"""

from __future__ import annotations

import signal
import sys
from dataclasses import dataclass
from multiprocessing.connection import Connection

import numpy as np

from cnnserve.errors import InvalidInputError
from cnnserve.models.image_batch import decode_image_batch
from cnnserve.models.imaging import read_header
from cnnserve.models.pixels import normalize
from cnnserve.models.spec import ModelSpec

#: A prepared batch: ``N×3×H×W`` rows (uint8 pixels, or normalized float32) and the failed
#: items' errors by their index in the batch (their rows are zeros).
Prepared = tuple[np.ndarray, dict[int, InvalidInputError]]


@dataclass(frozen=True)
class ImageJob:
    """One batch of encoded images, every header already checked and priced by the gateway."""

    spec: ModelSpec
    images: list[bytes]
    max_pixels: int
    #: Whether the backend wants normalized float32 (False: uint8 pixels, it normalizes).
    normalize: bool


def prepare_images(job: ImageJob) -> Prepared:
    """Decode ``job``'s images with the model's own steps, then normalize them when asked.

    A size-variable model's batch was formed from images whose headers declared one size
    (the batcher's key), so the first image's header says which size every image must
    declare again when Pillow reads it: none can decode to more than was priced.
    """
    declared = None
    if job.spec.fixed_size is None:
        declared = read_header(job.images[0], job.max_pixels).size
    decoded = decode_image_batch(job.spec, job.images, job.max_pixels, declared)
    if not job.normalize:
        return decoded.pixels, decoded.failures
    return normalize(decoded.pixels, job.spec.normalization), decoded.failures


@dataclass(frozen=True)
class WorkerFailure:
    """A job that failed as a whole in the worker for a reason other than its input (a bug):
    the gateway logs it and answers INTERNAL."""

    description: str


def serve(connection: Connection) -> None:
    """Answer jobs from ``connection`` until it closes."""
    while True:
        try:
            job = connection.recv()
        except EOFError:
            return
        answer: Prepared | InvalidInputError | WorkerFailure
        try:
            answer = prepare_images(job)
        except InvalidInputError as exc:
            answer = exc
        except Exception as exc:  # a bug, not the input: the gateway logs it
            answer = WorkerFailure(f"{type(exc).__name__}: {exc}")
        connection.send(answer)


def main() -> None:
    """Entry point of a decode process: ``python -m cnnserve.gateway.decode_worker FD``."""
    # Ctrl-C reaches the whole process group; the gateway decides when its workers end (it
    # closes their connections).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    serve(Connection(int(sys.argv[1])))


if __name__ == "__main__":
    # Through the package's module, not this __main__ copy of it: answers are pickled with
    # the classes the gateway imports (cnnserve.gateway.decode_worker.WorkerFailure).
    from cnnserve.gateway import decode_worker

    decode_worker.main()

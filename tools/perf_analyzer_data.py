"""Write an ``--input-data`` file for Triton's perf_analyzer (tools/perf_analyzer.sh).

A cnnserve model takes exactly one of three inputs per request (``input`` FP32, ``pixels``
UINT8, ``image`` BYTES; the model config marks each optional). Left to itself perf_analyzer
fills every input with random data and sends all three, which the gateway refuses; a data
file that names one input makes it send that one alone. The tensors are seeded random
values — pixels uniform in 0..255, or what a normalized image holds (standard normal) for
``input`` — since what a CNN costs does not depend on what the pixels show. Each entry is
one request of one item (perf_analyzer's ``-b`` repeats it); perf_analyzer cycles through
the entries.

    python tools/perf_analyzer_data.py OUT.json                      # pixels, 3×28×28
    python tools/perf_analyzer_data.py OUT.json --input input --shape 3,64,64 --count 4
"""

from __future__ import annotations

import argparse
import base64
import json
import random
import struct
from pathlib import Path

#: Input name → how one random element is drawn and packed (little-endian, as on the wire).
INPUTS = {
    "pixels": lambda rng, n: bytes(rng.randrange(256) for _ in range(n)),
    "input": lambda rng, n: struct.pack(f"<{n}f", *(rng.gauss(0.0, 1.0) for _ in range(n))),
}


def input_data(name: str, shape: tuple[int, ...], count: int, seed: int) -> dict[str, object]:
    """perf_analyzer's JSON: ``count`` entries, each the one input ``name`` of ``shape``
    (without the batch dimension), its raw bytes in base64."""
    rng = random.Random(seed)
    elements = 1
    for dim in shape:
        elements *= dim
    return {
        "data": [
            {
                name: {
                    "b64": base64.b64encode(INPUTS[name](rng, elements)).decode(),
                    "shape": list(shape),
                }
            }
            for _ in range(count)
        ]
    }


def parse_shape(text: str) -> tuple[int, ...]:
    """``3,28,28`` → ``(3, 28, 28)``: three positive sizes, channels first."""
    try:
        shape = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"shape {text!r} is not integers like 3,28,28") from None
    if len(shape) != 3 or shape[0] != 3 or min(shape) < 1:
        raise argparse.ArgumentTypeError(f"shape {text!r} must be 3,H,W with H and W ≥ 1")
    return shape


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="the JSON file to write")
    parser.add_argument("--input", choices=sorted(INPUTS), default="pixels")
    parser.add_argument(
        "--shape", type=parse_shape, default=(3, 28, 28), help="3,H,W (default: convnet's)"
    )
    parser.add_argument("--count", type=int, default=8, help="distinct requests (default 8)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(input_data(args.input, args.shape, args.count, args.seed)))


if __name__ == "__main__":
    main()

"""Write the sample images in examples/: held-out digits and an FCN scene, drawn by the
project's own generators, so the README's commands have images to send on a fresh clone.

    .venv/bin/python tools/make_examples.py            # rewrites examples/*.png

The digits are scikit-learn's bundled 8×8 digits of the held-out split the demo ConvNet never
trained on (``cnnserve.training.datasets``), rendered plainly (white on black, 64×64); the
scene is one the FCN's training generator draws (``cnnserve.models.scenes``, seed 1, 64×64).
The same seeds give the same bytes, so running it again changes nothing.
"""

from __future__ import annotations

import argparse
import io
from pathlib import Path

import numpy as np
from PIL import Image

from cnnserve.models.scenes import shapes_scene
from cnnserve.training.datasets import digits_split, render_digit

ROOT = Path(__file__).resolve().parent.parent
#: Positions in the held-out split (seed 0) of the digits shipped: a 7, a 3 and a 2.
DIGITS = (0, 2, 6)
SCENE_SEED = 1
SCENE_SIDE = 64


def png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def examples() -> dict[str, bytes]:
    """File name → PNG bytes of every sample image."""
    split = digits_split(0)
    images = {
        f"digit-{int(split.test_labels[i])}.png": png(render_digit(split.test_images[i], None))
        for i in DIGITS
    }
    scene, _ = shapes_scene(np.random.default_rng(SCENE_SEED), SCENE_SIDE)
    images["scene.png"] = png(scene)
    return images


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "examples")
    out = parser.parse_args().out
    out.mkdir(parents=True, exist_ok=True)
    for name, data in examples().items():
        (out / name).write_bytes(data)
        print(out / name)


if __name__ == "__main__":
    main()

"""The sample images in examples/ are what tools/make_examples.py draws, so they cannot drift
from the generators (tests/test_readme.py checks what the served models answer for them)."""

from __future__ import annotations

from pathlib import Path

from tests.images import digit_png, shapes_png
from tools.make_examples import examples

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def test_committed_images_are_the_generators_output() -> None:
    drawn = examples()
    assert sorted(drawn) == sorted(p.name for p in EXAMPLES.glob("*.png"))
    for name, data in drawn.items():
        assert (EXAMPLES / name).read_bytes() == data, f"examples/{name} differs: rerun the tool"
    # the images the tests draw, so the figures measured on those hold for these
    assert drawn["digit-7.png"] == digit_png(0)[0]
    assert drawn["scene.png"] == shapes_png(1, 64)[0]

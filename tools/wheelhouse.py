"""Fill build/wheelhouse/ with every wheel one deployment variant's images install.

The image builds install Python packages with ``pip install --no-index`` from this folder (a
bind mount of the build context), never from a package index: the build is the same with or
without a network, and nothing reaches an image that was not pinned and hash-checked here.
The host downloads each lock of the variant (deploy/requirements/, written by deploy/lock.py)
with ``pip download --require-hashes``: a file whose sha256 differs from the lock's fails here.

    python3 tools/wheelhouse.py --variant cpu   # gateway + CPU TorchServe + the build stage
    python3 tools/wheelhouse.py --variant gpu   # gateway + CUDA TorchServe + the build stage

A lock whose every file is already present, with the right hash, is not downloaded again.
Needs only the standard library and pip (``python3 -m pip``), not cnnserve's environment.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LOCK_DIR = ROOT / "deploy" / "requirements"
WHEELHOUSE = ROOT / "build" / "wheelhouse"
#: Where PyTorch publishes its +cpu builds (the CPU variant's torch).
CPU_INDEX = "https://download.pytorch.org/whl/cpu"
#: The locks each variant's images (and the build stage they share) install.
VARIANT_LOCKS = {
    "cpu": ("gateway", "torchserve-cpu", "build"),
    "gpu": ("gateway", "torchserve-gpu", "build"),
}


def lock_hashes(lock: str) -> set[str]:
    """The sha256 digests ``lock`` pins, one per package."""
    text = (LOCK_DIR / f"{lock}.txt").read_text()
    return set(re.findall(r"--hash=sha256:([0-9a-f]{64})", text))


def present_hashes(wheelhouse: Path) -> set[str]:
    """The sha256 digests of the wheels already in ``wheelhouse``."""
    return {hashlib.sha256(wheel.read_bytes()).hexdigest() for wheel in wheelhouse.glob("*.whl")}


def download(lock: str, wheelhouse: Path) -> None:
    """Download ``lock``'s wheels into ``wheelhouse``, each checked against its hash."""
    command = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps"]
    command += ["--only-binary", ":all:", "--require-hashes", "--dest", str(wheelhouse)]
    command += ["--requirement", str(LOCK_DIR / f"{lock}.txt")]
    env = dict(os.environ)
    if lock.endswith("-gpu"):
        # A local "+cpu" torch (find-links in a pip config) also matches torch==2.13.0; its
        # hash would fail the lock, so the CUDA variant comes from pip's default index alone.
        env = {name: value for name, value in env.items() if not name.startswith("PIP_")}
        env["PIP_CONFIG_FILE"] = os.devnull
    else:
        # One retry: where that index is out of reach (a wheel of its +cpu torch found locally
        # instead), each package's look-up there must fail in seconds, not minutes.
        command += ["--extra-index-url", CPU_INDEX, "--retries", "1"]
    result = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        detail = (result.stderr.strip().splitlines() or ["pip failed"])[-1]
        raise SystemExit(f"error: wheelhouse: downloading {lock}.txt failed: {detail}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", choices=sorted(VARIANT_LOCKS), required=True)
    parser.add_argument("--dest", type=Path, default=WHEELHOUSE, help="default: %(default)s")
    args = parser.parse_args()
    args.dest.mkdir(parents=True, exist_ok=True)
    # A full wheelhouse is checked here in a second or two; pip download would ask the index
    # about every package again (~25 s) only to find each file present.
    present = present_hashes(args.dest)
    for lock in VARIANT_LOCKS[args.variant]:
        if not lock_hashes(lock) <= present:
            download(lock, args.dest)
    wheels = list(args.dest.glob("*.whl"))
    size_mb = sum(wheel.stat().st_size for wheel in wheels) / 1e6
    print(f"wheelhouse {args.dest}: {len(wheels)} wheels, {size_mb:.0f} MB ({args.variant})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

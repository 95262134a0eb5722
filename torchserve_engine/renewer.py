"""The key renewer ``cnnserve torchserve start`` leaves behind beside its TorchServe.

``cnnserve torchserve start`` returns once the workers are READY, and TorchServe never renews
its keys by itself: a server used without a gateway (curl with ``key_file.json``) would refuse
every call after ``torchserve_token_expiration_min``. So the command starts this small detached
process (its own session, output appended to ``<run dir>/logs/renewer.log``, pid in
``<run dir>/renewer.pid``)::

    python -m cnnserve.torchserve_engine.renewer <model store> --fraction 0.25

It calls :func:`~.process.renew_keys` every second (a read of the key file; TorchServe is
asked only when a key is due) and exits by itself once the JVM it was started for is gone;
``cnnserve torchserve stop`` ends it first (:func:`~.process.stop`). A failed renewal is
logged once per failing spell and tried again at the next check, never a crash. The
container's entry point and a gateway renew on their own: only the command starts this.
"""

from __future__ import annotations

import argparse
import logging
import subprocess
import sys
import time
from pathlib import Path

from .process import (
    RENEWER_LOG,
    RENEWER_MODULE,
    RENEWER_PID_FILE,
    ServerInfo,
    is_running,
    renew_keys,
    run_dir_of,
)

#: Seconds between two checks whether a key is due (and whether the JVM still lives).
CHECK_INTERVAL_S = 1.0

# Named, not __name__: run with ``-m`` the module is ``__main__``.
logger = logging.getLogger(RENEWER_MODULE)


def spawn(info: ServerInfo, fraction: float) -> int | None:
    """Start a detached renewer for ``info``'s TorchServe and record its pid in the run
    directory; its pid, or ``None`` when nothing would be renewed (tokens off, ``fraction``
    0, or a server without a known key lifetime)."""
    if info.key_file is None or info.token_lifetime_s is None or fraction <= 0:
        return None
    logs = info.run_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    command = [
        sys.executable,
        "-m",
        RENEWER_MODULE,
        str(info.model_store),
        "--fraction",
        str(fraction),
    ]
    with (logs / RENEWER_LOG).open("ab") as output:
        # Its own session: it outlives the command and a Ctrl-C in the terminal it came from.
        renewer = subprocess.Popen(
            command,
            cwd=info.run_dir,
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    (info.run_dir / RENEWER_PID_FILE).write_text(f"{renewer.pid}\n")
    return renewer.pid


def renew_while_running(
    model_store: Path, fraction: float, interval_s: float = CHECK_INTERVAL_S
) -> None:
    """Renew the keys of the TorchServe running from ``model_store`` whenever due, until its
    JVM is gone (a server started later from the same store has a renewer of its own)."""
    info = ServerInfo.load(run_dir_of(model_store))
    if info is None:
        logger.warning("no TorchServe was started from %s; nothing to renew", model_store)
        return
    logger.info("renewing the keys of TorchServe pid %d (fraction %g)", info.pid, fraction)
    failing = False
    while is_running(info):
        try:
            renewed = renew_keys(info, fraction)
        except Exception as exc:
            # Any failure (TorchServe not answering, a key file being rewritten, a run
            # directory cleaned by a stop): were this loop to end, the keys would expire.
            if not failing:  # once per failing spell, not every second
                logger.warning("%s; trying again every %g s", exc, interval_s)
            failing = True
        else:
            if renewed:
                logger.info("renewed TorchServe's %s key", " and ".join(renewed))
            failing = False
        time.sleep(interval_s)
    logger.info("TorchServe pid %d is gone; the renewer exits", info.pid)


def main(argv: list[str] | None = None) -> None:
    """``python -m cnnserve.torchserve_engine.renewer <model store> --fraction F``."""
    parser = argparse.ArgumentParser(
        prog=f"python -m {RENEWER_MODULE}", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("model_store", type=Path, help="The store TorchServe was started from.")
    parser.add_argument(
        "--fraction",
        type=float,
        required=True,
        help="Renew a key once less than this fraction of its lifetime is left.",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    # One line per renewal in the log, not one more per token API request.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    renew_while_running(args.model_store, args.fraction)


if __name__ == "__main__":
    main()

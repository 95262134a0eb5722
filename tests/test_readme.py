"""Every shell command and Python example in the README, run (tests/readme.py says how
blocks are tagged).

The server is the one the README's "Serving and calling" starts, ``cnnserve serve --backend
onnxruntime`` on the default ports 8000, 8001, 8002, in a scratch folder that holds what the
commands need from the checkout (``examples/``, ``models/``, ``tools/``) and where they write
their files; it makes its default model repository there, as a first start does. The blocks run
in README order against it, each with ``set -euo pipefail``. The TorchServe block starts its own
TorchServe from that folder (the ``torchserve`` mark). Blocks no test can run here are checked
statically. The quickstart on a fresh clone is tests/test_quickstart.py.
"""

from __future__ import annotations

import re
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.readme import ROOT, Block, blocks, check_statically, environment, run_block
from tests.support import stop_process, wait_until

BLOCKS = blocks()
PORTS = (8000, 8001, 8002)
#: The TorchServe ports the README's TorchServe block uses (REST, management, metrics, gRPC).
TORCHSERVE_PORTS = (8080, 8081, 8082, 7070, 7071)


def _taken(ports: tuple[int, ...]) -> list[int]:
    taken = []
    for port in ports:
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                taken.append(port)
    return taken


@pytest.fixture(scope="module")
def scratch(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The folder the commands run in, with the checkout's folders they read."""
    folder = tmp_path_factory.mktemp("readme")
    for name in ("examples", "models", "tools", ".venv"):
        (folder / name).symlink_to(ROOT / name)
    return folder


@pytest.fixture(scope="module")
def server(scratch: Path) -> Iterator[None]:
    """The README's server command, ready (``/v2/health/ready`` 200), stopped after."""
    (command,) = [block for block in BLOCKS if block.tag == "server"]
    taken = _taken(PORTS)
    assert not taken, f"the README's ports {taken} are in use: stop what listens there first"
    log = (scratch / "server.log").open("w")
    process = subprocess.Popen(
        ["bash", "-c", command.text], cwd=scratch, env=environment(), stdout=log, stderr=log,
        start_new_session=True,
    )  # fmt: skip

    def ready() -> bool:
        assert process.poll() is None, (scratch / "server.log").read_text()
        try:
            return httpx.get("http://127.0.0.1:8000/v2/health/ready").status_code == 200
        except httpx.TransportError:
            return False

    try:
        wait_until(ready, 180, "the README's server to be ready", interval_s=0.5)
        yield
    finally:
        stop_process(process, 60)
        log.close()


def _case(block: Block) -> object:
    marks = [pytest.mark.torchserve] if "torchserve start" in block.text else []
    return pytest.param(block, id=str(block), marks=marks)


@pytest.mark.parametrize(
    "block", [_case(b) for b in BLOCKS if b.tag in ("run", "quickstart") and "make " not in b.text]
)
def test_block_runs(block: Block, scratch: Path, server: None) -> None:
    if "torchserve start" not in block.text:
        run_block(block, scratch)
        return
    taken = _taken(TORCHSERVE_PORTS)
    assert not taken, f"TorchServe's ports {taken} are in use: stop what listens there first"
    try:
        run_block(block, scratch)
    finally:  # the block's own stop does not run when a command before it fails
        subprocess.run(
            [str(ROOT / ".venv/bin/cnnserve"), "torchserve", "stop"],
            cwd=scratch, env=environment(), capture_output=True, timeout=120, check=False,
        )  # fmt: skip


@pytest.mark.parametrize(
    "block", [pytest.param(b, id=str(b)) for b in BLOCKS if b.tag in ("not run", "server")
              or "make " in b.text]
)  # fmt: skip
def test_block_not_run_still_checks(block: Block) -> None:
    assert check_statically(block) == []


def test_every_tag_is_known_and_says_why() -> None:
    assert {b.tag for b in BLOCKS} <= {"run", "quickstart", "server", "not run"}
    assert all(b.why for b in BLOCKS if b.tag == "not run"), "a `not run` block says why"
    # a block that is run may not hide a make command: make runs in the checkout, not here
    assert not [str(b) for b in BLOCKS if b.tag == "run" and "make " in b.text]


def test_static_checks_catch_what_does_not_exist() -> None:
    """The static checks fail on a make target or cnnserve option that does not exist, and on
    Python that does not compile."""
    bad = Block("not run", "a test", "make no-such-target\ncnnserve serve --no-such-option 1\n", 0)
    problems = check_statically(bad)
    assert len(problems) == 2 and "--no-such-option" in problems[1], problems
    broken_python = Block("not run", "a test", "print(\n", 0, "python")
    assert len(check_statically(broken_python)) == 1


def _anchors(page: Path) -> set[str]:
    """The anchors GitHub gives a page's headings: lower case, punctuation but ``-`` and
    ``_`` dropped, spaces as ``-``."""
    headings = re.findall(r"^#{1,6} (.+)$", page.read_text(), re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}


@pytest.mark.parametrize(
    "page", ["README.md", "docs/security.md", "docs/deployment.md", "examples/README.md"]
)
def test_links_lead_somewhere(page: str) -> None:
    """Every relative link of the README (and of the pages its sections moved to) names a file
    that exists, and a heading there when it names one (``#anchor``)."""
    source = ROOT / page
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", source.read_text()):
        if "://" in target:
            continue
        path, _, anchor = target.partition("#")
        linked = (source.parent / path).resolve() if path else source
        if not linked.exists() or (
            anchor and linked.suffix == ".md" and anchor not in _anchors(linked)
        ):
            broken.append(target)
    assert broken == []

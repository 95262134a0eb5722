"""The README's shell and Python blocks, read as tests/test_readme.py and
tests/test_quickstart.py run them.

A fenced ``bash`` block runs with bash, a ``python`` block with the venv's Python, as written,
unless the HTML comment right above it says otherwise:

- ``<!-- readme-test: quickstart (...) -->`` — the quickstart: run word for word on a fresh
  clone (tests/test_quickstart.py); its ``make`` lines are dry-run elsewhere.
- ``<!-- readme-test: server (...) -->`` — the command that starts the server the other blocks
  call (tests/test_readme.py starts it).
- ``<!-- readme-test: not run (why) -->`` — a block no test can run here (it installs packages,
  retrains for minutes, needs Docker, a GPU or a tool that is not installed). Still checked:
  each ``make`` target with ``make -n``, each ``cnnserve`` command with ``--help`` listing
  every option it uses, a Python block by compiling it.

Output the README shows (``# ...`` lines) is checked loosely by its key parts
(:data:`KEY_PARTS`): a label, a printed prediction, a page title, readiness, a request id.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
VENV_BIN = ROOT / ".venv" / "bin"

_BLOCK = re.compile(
    r"(?:<!-- readme-test: (?P<tag>[a-z ]+?)(?: \((?P<why>.*?)\))? -->\n)?"
    r"```(?P<language>bash|python)\n(?P<body>.*?)```",
    re.S,
)
#: What of a shown output line must be in the real output: labels, a ``cnnserve predict``
#: line up to its probability, a page title, readiness, the FCN's counts (not their values,
#: which may differ by a pixel between backends), a request id sent back, a label printed by
#: Python.
KEY_PARTS = (
    re.compile(r'"label":"[^"]+"'),
    re.compile(r"\S+\.png: \w+ \("),
    re.compile(r"<title>[^<]*</title>"),
    re.compile(r'\{"ready":true\}'),
    re.compile(r'"counts":\{"background":'),
    re.compile(r"x-request-id: \S+"),
    re.compile(r"\[b'[^']*'\]"),  # tritonclient's BYTES labels, as numpy prints them
    re.compile(r"label='[^']*'"),  # the Python client's Classification
)
_SHELL_OPERATORS = {"|", "||", "&&", ";", ">", ">>", "<", "&"}


@dataclass(frozen=True)
class Block:
    """One fenced block: its tag (``run`` when untagged), why, text, line in README and
    language (bash or python)."""

    tag: str
    why: str
    text: str
    line: int
    language: str = "bash"

    @property
    def commands(self) -> list[list[str]]:
        """Each command of a bash block as words (continuations joined, comments dropped);
        none for Python."""
        if self.language != "bash":
            return []
        joined = self.text.replace("\\\n", " ")
        commands = []
        for line in joined.splitlines():
            try:
                words = shlex.split(line, comments=True)
            except ValueError:  # a quote opened on this line closes on a later one
                words = line.split()
            if words:
                commands.append(words)
        return commands

    @property
    def expected(self) -> list[str]:
        """The key parts of the output the block shows in its ``# ...`` lines (in Python, the
        comment after a ``print(...)``)."""
        lines = self.text.splitlines()
        shown = (
            [line.partition("  # ")[2] for line in lines if line.lstrip().startswith("print(")]
            if self.language == "python"
            else [line for line in lines if line.lstrip().startswith("#")]
        )
        return [m.group(0) for line in shown for part in KEY_PARTS for m in part.finditer(line)]

    def __str__(self) -> str:
        return f"README.md:{self.line}"


def blocks(readme: Path = README) -> list[Block]:
    text = readme.read_text()
    return [
        Block(
            m.group("tag") or "run",
            m.group("why") or "",
            m.group("body"),
            text.count("\n", 0, m.start("body")) + 1,
            m.group("language"),
        )
        for m in _BLOCK.finditer(text)
    ]


def environment() -> dict[str, str]:
    """This process's environment as an activated .venv has it, without ``CNNSERVE_*``
    (the README's commands run with the defaults it describes)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CNNSERVE_")}
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    env["VIRTUAL_ENV"] = str(VENV_BIN.parent)
    env["COLUMNS"] = "200"  # help text unwrapped, so every option shows whole
    return env


def cnnserve_invocations(words: list[str]) -> list[list[str]]:
    """Each ``cnnserve ...`` in a command's words, up to the next shell operator."""
    found, current = [], None
    for word in words:
        if word in _SHELL_OPERATORS:
            current = None
        elif current is not None:
            current.append(word)
        elif word == "cnnserve" or word.endswith("/cnnserve"):
            current = []
            found.append(current)
    return found


def check_statically(block: Block) -> list[str]:
    """Problems with a block that is not run: make targets ``make -n`` refuses, cnnserve
    commands or options their ``--help`` does not list, Python that does not compile. Empty
    when all is well."""
    problems = []
    if block.language == "python":
        try:
            compile(block.text, str(block), "exec")
        except SyntaxError as exc:
            problems.append(f"{block}: {exc}")
    for words in block.commands:
        if words[0] == "make":
            dry = subprocess.run(
                ["make", "-n", *words[1:]], cwd=ROOT, capture_output=True, text=True, check=False
            )
            if dry.returncode != 0:
                problems.append(f"make -n {' '.join(words[1:])}: {dry.stderr.strip()}")
        for args in cnnserve_invocations(words):
            problems += _check_cnnserve(args)
    return problems


def _check_cnnserve(args: list[str]) -> list[str]:
    """``cnnserve ARGS`` against its help: the longest leading run of plain words that names a
    command, then each ``--option`` (its name, before any ``=``) in that command's help."""
    path = []
    for word in args:
        if not re.fullmatch(r"[a-z][a-z-]*", word):
            break
        path.append(word)
    while True:
        shown = subprocess.run(
            [str(VENV_BIN / "cnnserve"), *path, "--help"],
            capture_output=True, text=True, env=environment(), check=False,
        )  # fmt: skip
        if shown.returncode == 0 or not path:
            break
        path.pop()
    if shown.returncode != 0:
        return [f"cnnserve --help failed: {shown.stderr.strip()}"]
    options = {word.split("=")[0] for word in args if word.startswith("--")}
    return [
        f"cnnserve {' '.join(path)} has no option {option}"
        for option in sorted(options)
        if not re.search(rf"(?<![\w-]){re.escape(option)}(?![\w-])", shown.stdout)
    ]


def run_block(block: Block, cwd: Path, timeout_s: float = 300) -> str:
    """Run a block in ``cwd`` — bash with ``set -euo pipefail`` (every command must succeed),
    Python with the venv's interpreter; its stdout. Fails naming the block and showing its
    output when a command fails or a key part of the output it shows is missing."""
    program = (
        [str(VENV_BIN / "python"), "-c", block.text]
        if block.language == "python"
        else ["bash", "-c", "set -euo pipefail\n" + block.text]
    )
    done = subprocess.run(
        program,
        cwd=cwd, env=environment(), capture_output=True, text=True, timeout=timeout_s,
        check=False,
    )  # fmt: skip
    assert done.returncode == 0, (
        f"{block} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}"
    )
    missing = [part for part in block.expected if part not in done.stdout]
    assert not missing, f"{block}: output lacks {missing}:\n{done.stdout}"
    return done.stdout

"""``python -m cnnserve`` — the same as the ``cnnserve`` command."""

from cnnserve.cli import main

main()

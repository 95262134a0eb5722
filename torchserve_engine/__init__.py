"""TorchServe as cnnserve runs it: archives, configuration, the server process, a client.

Everything TorchServe-specific sits here and in ``handlers/``, so TorchServe (0.12.0, its
last release) can be replaced without touching the rest of cnnserve.
"""


class TorchServeError(Exception):
    """TorchServe could not be archived for, started or stopped; the message says why."""

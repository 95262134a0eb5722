"""The tutorial networks, their registry, the model-side steps and output semantics every
serving path shares, and the runners for exported artifacts (no transport: a TorchServe worker
imports this package)."""


class CheckpointError(Exception):
    """A checkpoint that cannot be used; the message names the file and the mismatch.

    Defined here, not in :mod:`.checkpoint` (which needs torch), so the command line can catch
    it where torch is not installed.
    """

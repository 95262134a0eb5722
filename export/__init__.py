"""TorchScript and ONNX export with on-the-spot parity checks."""


class ExportError(Exception):
    """Export failed or the exported artifacts disagree with the eager model.

    Defined here, not in :mod:`.exporter` (which needs torch), so the command line can catch
    it where torch is not installed.
    """

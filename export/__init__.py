"""TorchScript and ONNX export with on-the-spot parity checks."""

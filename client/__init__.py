"""A small Python client for cnnserve (Open Inference Protocol over gRPC or HTTP)."""

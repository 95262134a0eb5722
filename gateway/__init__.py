"""The gateway: Open Inference Protocol over gRPC and HTTP, dynamic batching, backends."""

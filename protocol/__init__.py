"""The wire layer both ends of a call share: the Open Inference Protocol and the error table.

- :mod:`.domain` — wire-neutral request and response types the transports exchange with the
  gateway's data plane;
- :mod:`.tensor_codec`, :mod:`.grpc_codec`, :mod:`.http_codec` — tensors and messages to and
  from those types, used by the gateway and :mod:`cnnserve.client` alike; they raise
  :class:`~.errors.CodecError`, which each side maps;
- :mod:`.triton_codec` — Triton's model configuration, statistics and model repository
  extensions: one protobuf message per answer, rendered as JSON for REST as Triton does;
- :mod:`.status` — the error table: each :class:`cnnserve.errors.Status` as a gRPC code and an
  HTTP status;
- ``*_pb2*.py`` — stubs generated from ``proto/`` (never edited; ``make proto``):
  ``open_inference`` is the OIP gRPC service (``model_config`` its model configuration
  messages), ``torchserve_inference`` TorchServe's inference API, which the ``torchserve``
  backend calls.

Importing this package loads no transport: only :mod:`.grpc_codec` and the ``*_pb2_grpc``
stubs import grpc (the TorchServe handlers use :mod:`.status` without it).
See docs/architecture.md, "Layers".
"""

"""The tutorial networks, their registry, the model-side steps and output semantics every
serving path shares, and the runners for exported artifacts (no transport: a TorchServe worker
imports this package)."""

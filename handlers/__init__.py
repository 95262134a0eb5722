"""TorchServe custom handlers: thin adapters over the shared model-side code."""

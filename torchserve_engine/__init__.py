"""TorchServe as cnnserve runs it: archives, configuration, the server process, a client."""

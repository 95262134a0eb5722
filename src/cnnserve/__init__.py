"""cnnserve: serve the tutorial CNNs over the Open Inference Protocol."""

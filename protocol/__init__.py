"""Generated gRPC stubs (never edited; regenerate with `make proto`)."""

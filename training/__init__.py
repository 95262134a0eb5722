"""Reproducible training of the demo weights on data that ships with the project."""

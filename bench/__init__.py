"""Benchmarks: an Open Inference Protocol load generator, baselines, and the suite report."""

"""Benchmarks run on the GPU machine; each prints a table and one JSON line last."""

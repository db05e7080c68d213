"""Benchmarks: each measures ours and the reference in the same run and prints a table."""

"""Benchmarks: each module prints a table and can write JSON (``python -m benchmarks.<name> --help``)."""

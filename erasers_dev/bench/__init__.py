"""Benchmarks that print tables (``python -m erasers bench NAME``); never timed assertions in tests."""

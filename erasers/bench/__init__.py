"""Benchmarks behind ``python -m erasers bench <name>``: each module has ``run(args)`` printing a table."""

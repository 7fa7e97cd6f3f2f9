"""``python -m erasers``: minimal dispatcher (only the ``shapes`` command so far)."""
import sys

from .shapes.cli import main

if __name__ == "__main__":
    sys.exit(main())

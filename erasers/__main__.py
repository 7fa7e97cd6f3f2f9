"""``python -m erasers …`` — see erasers/cli.py."""
import sys

from .cli import main

sys.exit(main())

"""``python -m erasers …``: the command line lives with the diffusers host (erasers_diffusers/cli.py).

The import is inside the guard so that importing the core package never pulls in a host.
"""

import sys

if __name__ == "__main__":
    from erasers_diffusers.cli import main

    sys.exit(main())

"""Install hook for A1111/Forge. Harmless everywhere else.

ComfyUI-Manager also runs ``install.py`` after ``requirements.txt``; its maintainers reject packs that
call pip from it, and the Manager has already installed requirements.txt. So this file installs only
when it runs inside A1111/Forge (its ``launch`` module is importable) and a dependency is missing.
"""

import importlib.util
import os
import re


def requirements() -> dict:
    """import name → requirement, from requirements.txt (itself generated from pyproject.toml)."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "requirements.txt")
    with open(path, encoding="utf-8") as handle:
        lines = [line.strip() for line in handle if line.strip() and not line.startswith("#")]
    return {re.split(r"[<>=!~\[ ;]", line, maxsplit=1)[0].replace("-", "_"): line for line in lines}


def main():
    if importlib.util.find_spec("launch") is None:
        return  # not A1111/Forge (ComfyUI-Manager, plain pip): nothing to do
    import launch  # A1111's own installer helpers

    for module, requirement in requirements().items():
        if not launch.is_installed(module):
            launch.run_pip(f"install {requirement}", f"Concept Erasers requirement: {requirement}")


main()

"""Install hook for A1111/Forge. Harmless everywhere else.

ComfyUI-Manager also runs ``install.py`` after ``requirements.txt``; its maintainers reject packs that
call pip from it, and the Manager has already installed requirements.txt. So this file installs only
when it runs inside A1111/Forge (its ``launch`` module is importable) and a dependency is missing.
"""
import importlib.util

REQUIREMENTS = {"safetensors": "safetensors>=0.4.2", "einops": "einops", "diffusers": "diffusers>=0.30"}


def main():
    if importlib.util.find_spec("launch") is None:
        return  # not A1111/Forge (ComfyUI-Manager, plain pip): nothing to do
    import launch  # A1111's own installer helpers

    for module, requirement in REQUIREMENTS.items():
        if not launch.is_installed(module):
            launch.run_pip(f"install {requirement}", f"Concept Erasers requirement: {requirement}")


main()

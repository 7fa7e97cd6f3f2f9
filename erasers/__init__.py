"""Concept Erasers core: host-agnostic, pure torch. Never imports ComfyUI, A1111 or a UI."""

__version__ = "0.1.0"

"""Development only: the shapes world, trainers, benchmarks and test stand-ins.

Never imported by the ComfyUI or A1111/Forge adapters; ``python -m erasers demo`` and ``bench`` use it.
"""

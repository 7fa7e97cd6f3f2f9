"""The diffusers host: apply erasers to diffusers pipelines, the command line, single-file checkpoints.

Needs the ``diffusers`` extra (``pip install "concept-erasers[diffusers]"``); the core (``erasers``) does not.
"""

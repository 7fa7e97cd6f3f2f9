"""Closed-form weight edits of the text projections: UCE, RECE, SPEED, MACE refinement (and their shared solve)."""

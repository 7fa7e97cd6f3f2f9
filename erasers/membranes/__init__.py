"""SPM membranes and erasure LoRAs: per-prompt gates (facilitated transport), run-time hooks, file formats."""

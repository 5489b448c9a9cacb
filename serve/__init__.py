"""enginekit.serve."""

"""enginekit.bench."""

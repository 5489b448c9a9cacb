"""enginekit.runtimes."""

"""enginekit.quant."""

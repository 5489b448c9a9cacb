"""quant stage tests."""

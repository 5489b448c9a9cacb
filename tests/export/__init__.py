"""export stage tests."""

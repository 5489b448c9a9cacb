"""core stage tests."""

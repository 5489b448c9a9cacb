"""app stage tests."""

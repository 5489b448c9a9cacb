"""bench stage tests."""

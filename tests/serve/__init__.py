"""serve stage tests."""

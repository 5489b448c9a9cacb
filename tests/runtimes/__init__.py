"""runtimes stage tests."""

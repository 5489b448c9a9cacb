"""The application layer: the CLI, optimize, demo and the renderers. The core never imports it."""

"""Built-in models shipped with enginekit (weights as safetensors)."""

"""enginekit.export: PyTorch models to ONNX artifacts, one module per model family."""

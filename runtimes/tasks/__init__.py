"""Tasks on top of the runners: image classification, and the prompt tokenizers of diffusion pipelines."""

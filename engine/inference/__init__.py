"""Streaming tiled prediction with a PyTorch or an onnxruntime runner (no torch import here)."""

"""GeoPEFT engine: parameter-efficient fine-tuning of geospatial foundation models.

Importing ``engine`` (or ``engine.data``, ``engine.inference``, ``engine.protocol``,
``engine.card``) does not import torch, so ONNX prediction runs with onnxruntime alone.
"""
__version__ = "0.1.0"

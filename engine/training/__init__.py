"""Training: Lightning system, data module and the ``train`` entry point."""

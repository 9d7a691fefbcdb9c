"""GeoPEFT engine."""

"""The GeoPEFT Processing provider and its algorithms (one per file)."""

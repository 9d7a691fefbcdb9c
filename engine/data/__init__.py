"""Rasters, labels, chips, splits and normalisation (numpy + rasterio; no torch)."""

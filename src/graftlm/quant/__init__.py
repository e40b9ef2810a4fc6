"""Palettization: k-means lookup tables, packed indices, mixed-bit plans and the dequantizing layers."""

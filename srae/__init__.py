"""SRAE: embed a CNN layer into a few faithful, visualisable x-features (Qi, Khorram & Li)."""

__version__ = "0.1.0"

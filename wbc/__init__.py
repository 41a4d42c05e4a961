"""wbc: white blood cell classification under long-tailed classes and stain shift."""

__version__ = "0.1.0"

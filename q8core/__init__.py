"""q8bert core: quantizer spec, NumPy reference, metrics, plugins, trainer. Imports no framework."""

__version__ = "0.1.0"

"""The version of surgeon (a leaf module: ``surgeon.__version__`` and the report read it)."""

__version__ = "0.1.0"

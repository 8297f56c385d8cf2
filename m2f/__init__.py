"""m2f: a compact, readable Mask2Former research workbench."""

__version__ = "0.1.0"

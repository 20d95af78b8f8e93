"""Generated stubs of the flora.v1 protocol; regenerate with ``python protos/generate.py``."""

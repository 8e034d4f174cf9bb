"""STRIDE reference benchmark: `python -m bench [--quick]`."""

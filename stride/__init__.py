"""STRIDE: training data attribution by sparse recovery from steering operators."""

__version__ = "0.1.0"

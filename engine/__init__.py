"""Kiln's engine: a small, general DAG engine that knows nothing about diffusion."""
__version__ = "0.1.0"

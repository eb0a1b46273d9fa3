"""Autotuning pipeline for neural-network inference on Apache TVM."""

__version__ = "0.1.0"

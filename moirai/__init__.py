"""Moirai: optimal placement and chained serving of ONNX models across heterogeneous devices."""

__version__ = "0.1.0"

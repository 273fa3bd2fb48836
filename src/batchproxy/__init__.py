"""batchproxy: a batching inference proxy that stands in for TensorFlow Serving."""

__version__ = "0.1.0"

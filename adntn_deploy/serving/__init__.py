"""Serving: an Open Inference Protocol v2 server over ONNX Runtime and TVM, and Triton repositories."""

"""Exporting models to ONNX, cutting them into segments and writing model packages."""

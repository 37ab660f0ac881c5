"""onnxruntime sessions, model packages, tensor codecs and the dynamic batcher (no HTTP here)."""

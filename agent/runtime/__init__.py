"""Inference runtimes (llama.cpp, ONNX Runtime) and the lifecycle of loaded models."""

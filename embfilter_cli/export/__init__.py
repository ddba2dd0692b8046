"""Deployment formats for a filter: ONNX (standalone and appended), sentence-transformers, npy, safetensors."""

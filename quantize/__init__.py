"""GGUF export and llama.cpp quantization (not built yet)."""

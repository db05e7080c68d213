"""llama.cpp inference, speculative decoding and the OpenAI-compatible server (not built yet)."""

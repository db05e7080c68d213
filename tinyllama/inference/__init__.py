"""Running a model: the streaming generator (speculative decoding included), the PyTorch and
llama.cpp backends, draft-length policy, prompt lookup, static-shape decoding, the CPU decode layout."""

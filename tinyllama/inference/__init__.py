"""Running a model: the streaming generator (speculative decoding included), the PyTorch and
llama.cpp backends, drafters (a draft model, prompt lookup) and draft policies, static-shape
decoding, the CPU decode layout."""

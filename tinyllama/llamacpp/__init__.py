"""llama.cpp beside the project: which llama-cpp-python build suits this CPU, and llama.cpp's own tools."""

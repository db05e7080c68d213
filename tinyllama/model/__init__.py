"""The model: its configuration and presets, the Llama module, and the attention/norm kernels behind it."""

"""quantize: an HF-format Llama directory to GGUF for llama.cpp (gguf-py writes the float files,
llama.cpp's own quantizer the quantized ones), each file checked in llama.cpp.

    python -m quantize --model out/sft --type q4_k_m q8_0 --out out/gguf
    from quantize.pipeline import export; from quantize.export import write_gguf, quantize_gguf
"""

"""Quantization passes: INT weights (RTN, GPTQ), activation bit widths and clips, the KV cache."""

"""Triton kernels and their pure-torch references (installed as ``asaf_fx.triton_kernels``).

One module per concern, each kernel beside its reference with the same signature:
``int4`` (nibble packing, weight RTN), ``quantize`` (per-token activations), ``hadamard``
(online rotation and fused rotation + quantization), ``gemm`` (W4A4/W4A8 and W4A16), ``kv_quant``
(KV cache), ``_runtime`` (interpreter detection, exact rounding). The graph-facing
``torch.ops.asaf_fx`` ops and their dispatch live in ``asaf_fx.ops``.
"""

"""Triton kernels, their pure-torch references and the ops that call them (``asaf_fx.triton_kernels``).

One module per concern, each kernel beside its reference with the same signature:
``int4`` (nibble packing and the weight layout), ``quantize`` (per-token activations), ``hadamard``
(online rotation and fused rotation + quantization), ``gemm`` (W4A4/W4A8 and W4A16), ``gemv``
(decode), ``cublas`` (vendor GEMMs), ``routes`` (which GEMM serves which shape), ``kv_quant`` (KV
cache), ``_runtime`` (interpreter detection, exact rounding). ``ops`` registers the graph-facing
``torch.ops.asaf_fx`` custom ops, with their fake kernels, and dispatches them to these kernels.
"""

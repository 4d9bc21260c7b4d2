"""Lowering: replace quantized linears with the ``torch.ops.asaf_fx`` kernel ops."""

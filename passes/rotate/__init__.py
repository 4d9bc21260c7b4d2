"""Rotation passes: untie embeddings, fold RMSNorm scales, rotate the residual stream, the V/O and
Q/K rotations and the online Hadamards before ``down_proj``/``o_proj``."""

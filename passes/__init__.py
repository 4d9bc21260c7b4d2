"""Graph passes over captured Hugging Face models (installed as ``asaf_fx.passes``).

capture (torch.export) → untie_embeddings → fold_norms → rotate_residual → online_hadamard (before
down_proj) → rotate_vo → rotate_qk, run by ``infra.PassManager``. Structure is matched in
``patterns`` (RMSNorm, SwiGLU, RoPE, attention) and ``residual`` (the residual stream).
"""

"""Graph passes over captured Hugging Face models (installed as ``asaf_fx.passes``).

Infrastructure and capture live at the top: ``capture`` (torch.export), ``infra`` (passes, the pass
manager, shape propagation), ``graph_utils``, ``patterns`` (RMSNorm, SwiGLU, RoPE, attention),
``split_layers`` and ``layerwise`` (one decoder layer at a time), ``linear_stats`` and ``threads``.
The transforms are grouped by stage, in the order ``asaf_fx.compile`` runs them:
``rotate/`` → ``prune/`` → ``quantize/`` → ``lower/``. Passes depend on torch and
``asaf_fx.triton_kernels`` only.
"""

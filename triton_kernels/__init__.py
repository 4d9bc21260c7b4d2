"""Triton kernels and their pure-torch references (installed as ``asaf_fx.triton_kernels``)."""

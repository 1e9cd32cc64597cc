"""Triton kernels of the CUDA plugin: paged attention (windows, soft-caps), KV-cache writes,
RMSNorm, rotary embedding, SiLU- and GELU-tanh-and-mul, the grammar bitmask, fused MoE
(router top-k, alignment by expert, grouped GEMMs) and batched LoRA (shrink/expand).

Rule: every op here is a real Triton kernel checked against the torch reference of the core
(`engine/models/layers/...`, `platforms/testing`); importing this package imports nothing
heavy, each module imports triton itself.
"""

"""Triton kernels of the CUDA plugin: paged attention, KV-cache writes, RMSNorm, rotary
embedding and SiLU-and-mul.

Rule: every op here is a real Triton kernel checked against the torch reference of the core
(`engine/models/layers/...`, `platforms/testing`); importing this package imports nothing
heavy, each module imports triton itself.
"""

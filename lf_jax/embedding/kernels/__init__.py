"""Fused CPU kernels of the embedding engine's local sparse step (C++ through XLA's FFI).

``fused`` holds the JAX calls and the ``kernel`` setting (auto | fused | xla), ``build``
compiles sparse_step.cc once per machine and registers it.
"""

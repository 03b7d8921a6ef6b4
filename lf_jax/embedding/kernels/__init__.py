"""Fused CPU kernels of the embedding engine (C++ through XLA's FFI).

``fused`` holds the JAX calls of the local sparse step and the ``kernel`` setting (auto |
fused | xla), ``dynamic`` those of dynamic tables' key resolve (same setting), ``build``
compiles every ``*.cc`` here (sparse_step.cc, dynamic.cc) once per machine and registers
them.
"""

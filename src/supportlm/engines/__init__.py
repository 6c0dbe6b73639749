"""Engines: the `Engine` contract (`base`) and the backends serving it (transformers, llama.cpp)."""

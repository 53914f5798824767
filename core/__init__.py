"""The shared, torch-free kernel of LMForge.

The job spec, the engine's contract types, the split arithmetic, text statistics, the built-in
corpora and the domain errors. Imports only the standard library and pydantic, and neither
``store``, ``app``, ``worker`` nor ``lmforge`` (docs/architecture.md, "Layers").
"""

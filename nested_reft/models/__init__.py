"""The model: loading (hub, local directory, GGUF, aliases), tiny random models, LoRA adapters.

May import: config, store.
"""

"""Data: manifests -> decoded clips -> clean pyramid token layout -> packed grain batches.

Modules: ``text`` (byte captions), ``video`` (PyAV/Pillow decoding), ``manifest`` (JSON Lines
records and validation), ``layout`` (pure NumPy token layout shared with the sampler) and
``pipeline`` (the grain pipeline of packed batches).
"""

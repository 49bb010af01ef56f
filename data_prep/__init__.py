"""Data preparation: turn a corpus into GPT-2 token shards, and read them back for training.

- ``python -m data_prep.prepare --source SOURCE --out DIR``: see ``data_prep.prepare``.
- ``data_prep.reader``: ``TokenDataset`` and ``BatchLoader`` for the training loop.

Submodules are imported explicitly (``from data_prep.prepare import prepare``) so that
preparing data never imports torch, which only the reader needs (the tokenizer and the
atomic writer come from ``hooked_gpt2``, whose package import is lazy; tested with torch
made unimportable).
"""

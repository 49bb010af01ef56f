"""The code files ``save_hf`` copies, unchanged, into an export (``hooked_gpt2.hf_custom``):
a configuration class and a modeling file for the architectures no native Hugging Face
class fits, and a tokenizer for compact vocabularies. ``transformers`` imports them from
the export directory with ``trust_remote_code=True``, so they import only ``torch``,
``tokenizers``, ``transformers`` and each other, never ``hooked_gpt2``
(``tests/test_hf_custom.py`` loads them where it cannot be imported). A package here so
that they install with hooked-gpt2; nothing in hooked-gpt2 imports them.
"""

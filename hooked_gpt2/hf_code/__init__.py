"""The code files ``save_hf`` copies, unchanged, into an export that no native Hugging
Face class fits (``hooked_gpt2.hf_custom``): a configuration class, a modeling file and a
tokenizer for compact vocabularies. ``transformers`` imports them from the export
directory with ``trust_remote_code=True``, so they import only ``torch``,
``transformers`` and each other, never ``hooked_gpt2``; they are a package here only so
that the tests can import them too.
"""

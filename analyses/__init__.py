"""Interpretability analyses on a HookedGPT2: library functions for notebooks, and scripts
``python -m analyses.<name> --checkpoint DIR --out DIR`` that write a self-contained
``report.html`` (no network access needed to view it) and ``results.json``.

Modules: ``logit_lens``, ``attention``, ``ablation``, ``patching``, ``heads`` (detectors),
``dla``, ``report`` (all of them on one page), ``html`` (the page builder), ``cli``;
``evaluate`` (test loss and HellaSwag across models) and ``judge`` (LLM-judge scores of
fine-tuned models' responses) print tables and write JSON instead.

>>> from analyses.heads import induction_scores
>>> induction_scores(model, seed=0).shape  # [n_layers n_heads]
torch.Size([2, 4])
"""

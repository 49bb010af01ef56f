"""The names the library's docstring examples use, for ``pytest --doctest-modules``
(pyproject.toml collects the doctests of hooked_gpt2, analyses, data_prep and training):
a small random GPT-2 with GPT-2's vocabulary, some prompts as tokens, a logit-difference
metric and a scratch directory. Everything runs offline, on the CPU, in seconds."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _doctest_names(request):
    if not isinstance(request.node, pytest.DoctestItem):
        return
    from analyses.common import logit_diff
    from hooked_gpt2 import GPT2Config, HookedGPT2

    torch.manual_seed(0)
    model = HookedGPT2(GPT2Config.preset("tiny")).eval()
    mary, john = (model.to_tokens(name, prepend_bos=False)[0, 0].item() for name in (" Mary", " John"))
    names = request.getfixturevalue("doctest_namespace")
    names.update(
        torch=torch, model=model, tokens=model.to_tokens("The cat sat on the mat"),
        clean=model.to_tokens("When John and Mary went to the store, John gave a drink to"),
        corrupted=model.to_tokens("When John and Mary went to the store, Mary gave a drink to"),
        metric=logit_diff(mary, john),
        tmp_path=request.getfixturevalue("tmp_path"),
    )

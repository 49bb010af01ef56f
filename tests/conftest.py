"""Shared fixtures: a tiny random GPT-2 (with GPT-2's vocabulary, so prompts tokenize)
saved as a checkpoint, the planted induction model, and prepared tiny-shakespeare shards.

Tests never touch the network: the Hugging Face libraries are told they are offline, in
this process and in every subprocess a test starts."""

import os
from pathlib import Path

import pytest
import torch

from hooked_gpt2 import GPT2Config, HookedGPT2
from tests.planted import build_planted_induction_model

for _var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ[_var] = "1"


@pytest.fixture(scope="session")
def tiny_model() -> HookedGPT2:
    torch.manual_seed(0)
    cfg = GPT2Config.preset("tiny", d_model=64, n_heads=4, n_ctx=64, d_vocab=50257)
    model = HookedGPT2(cfg).eval()
    with torch.no_grad():  # non-zero biases, so that tests notice a bias left out
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.05)
    return model


@pytest.fixture(scope="session")
def tiny_checkpoint(tiny_model, tmp_path_factory):
    return tiny_model.save_pretrained(tmp_path_factory.mktemp("ckpt") / "tiny")


@pytest.fixture(scope="session")
def planted():
    return build_planted_induction_model()


# Training tests: tiny-shakespeare prepared once per session.
REPO = Path(__file__).resolve().parents[1]


def shakespeare_txt() -> Path:
    """The shared tiny-shakespeare text: ``<repo>/../shared/data`` in CI, else /work/shared."""
    for root in (REPO.parent / "shared", Path("/work/shared")):
        path = root / "data" / "tinyshakespeare.txt"
        if path.is_file():
            return path
    pytest.fail("tinyshakespeare.txt not found under ../shared/data or /work/shared/data: the training and "
                "data tests need it (clone the repository beside shared/, as .ci/run expects)", pytrace=False)


@pytest.fixture(scope="session")
def shakespeare_data(tmp_path_factory) -> Path:
    """tiny-shakespeare prepared with data_prep (GPT-2 tokens, ~325k train / ~6k val)."""
    from data_prep.prepare import prepare

    out = tmp_path_factory.mktemp("data") / "shakespeare"
    return prepare(str(shakespeare_txt()), out, txt_docs="paragraph", val_tokens=20_000,
                   progress=False, log=lambda *a: None)

"""Shared test fixtures. Keep each fixture small and clearly named: several branches add here."""

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def shakespeare_txt() -> Path:
    """The shared tiny-shakespeare text: ``<repo>/../shared/data`` in CI, else /work/shared."""
    for root in (REPO.parent / "shared", Path("/work/shared")):
        path = root / "data" / "tinyshakespeare.txt"
        if path.is_file():
            return path
    pytest.skip("tinyshakespeare.txt not found under ../shared/data or /work/shared/data")


@pytest.fixture(scope="session")
def shakespeare_data(tmp_path_factory) -> Path:
    """tiny-shakespeare prepared with data_prep (GPT-2 tokens, ~325k train / ~6k val)."""
    from data_prep.prepare import prepare

    out = tmp_path_factory.mktemp("data") / "shakespeare"
    return prepare(str(shakespeare_txt()), out, txt_docs="paragraph", val_tokens=20_000,
                   progress=False, log=lambda *a: None)

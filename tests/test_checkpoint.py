"""save_pretrained / from_pretrained: bitwise round trips and clear errors on bad files."""

import json
import os

import pytest
import torch

from hooked_gpt2 import CheckpointError, GPT2Config, HookedGPT2


@pytest.fixture(params=[dict(), dict(tie_embeddings=False, qkv_bias=False), dict(attn_only=True)],
                ids=["tied", "untied-no-bias", "attn-only"])
def model(request):
    torch.manual_seed(0)
    cfg = GPT2Config(n_layers=2, d_model=32, n_heads=4, n_ctx=16, d_vocab=101, **request.param)
    return HookedGPT2(cfg)


def test_round_trip_is_bitwise(model, tmp_path):
    model.save_pretrained(tmp_path)
    loaded = HookedGPT2.from_pretrained(tmp_path)
    assert loaded.cfg == model.cfg
    original, restored = model.state_dict(), loaded.state_dict()
    assert original.keys() == restored.keys()
    for name in original:
        assert torch.equal(original[name], restored[name]), name
    assert (loaded.unembed.weight is loaded.embed.weight) == model.cfg.tie_embeddings
    tokens = torch.randint(0, 101, (2, 16))
    model.eval()
    assert torch.equal(model(tokens), loaded(tokens))


def test_no_temporary_files_left(model, tmp_path):
    model.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]


def test_missing_directory_and_files(model, tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint directory"):
        HookedGPT2.from_pretrained(tmp_path / "nope")
    model.save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model.safetensors is missing"):
        HookedGPT2.from_pretrained(tmp_path)
    (tmp_path / "config.json").unlink()
    with pytest.raises(CheckpointError, match="config.json is missing"):
        HookedGPT2.from_pretrained(tmp_path)


def test_truncated_and_corrupt_weights(model, tmp_path):
    model.save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        HookedGPT2.from_pretrained(tmp_path)
    weights.write_bytes(b"\x00" * 64)
    with pytest.raises(CheckpointError, match="model.safetensors is corrupt or truncated"):
        HookedGPT2.from_pretrained(tmp_path)


def test_corrupt_config(model, tmp_path):
    model.save_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        HookedGPT2.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"n_layers": 2}))
    with pytest.raises(CheckpointError, match="not a hooked-gpt2 config"):
        HookedGPT2.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"format": "hooked-gpt2", "n_layers": -1}))
    with pytest.raises(CheckpointError, match="n_layers must be a positive integer"):
        HookedGPT2.from_pretrained(tmp_path)


def test_mismatched_config(model, tmp_path):
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["d_model"] = 64
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="does not match its config.*shape mismatches"):
        HookedGPT2.from_pretrained(tmp_path)
    config["d_model"], config["n_layers"] = 32, 3
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="missing tensors"):
        HookedGPT2.from_pretrained(tmp_path)


def test_pickle_is_never_loaded(model, tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("from_pretrained must not unpickle")

    model.save_pretrained(tmp_path)
    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr("pickle.load", refuse)
    HookedGPT2.from_pretrained(tmp_path)


def test_loading_and_processing_leave_the_checkpoint_and_earlier_loads_untouched(model, tmp_path):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".ln" in name or name.startswith("ln_final"):
                p.normal_(1, 0.3)
    model.save_pretrained(tmp_path)
    files = {path.name: path.read_bytes() for path in tmp_path.iterdir()}
    earlier = HookedGPT2.from_pretrained(tmp_path)
    tokens = torch.randint(0, 101, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = earlier(tokens)
    processed = HookedGPT2.from_pretrained(tmp_path, process_weights=True)
    with torch.no_grad():
        processed.process_weights_()  # a second pass, as a notebook might
        assert torch.equal(earlier(tokens), expected)
    assert files == {path.name: path.read_bytes() for path in tmp_path.iterdir()}


@pytest.mark.parametrize("save", ["save_pretrained", "save_hf"])
def test_saving_refuses_to_replace_a_checkpoint_or_a_non_empty_directory(save, tmp_path):
    torch.manual_seed(0)
    first = HookedGPT2(GPT2Config(n_layers=1, d_model=32, n_heads=4, n_ctx=16, d_vocab=101))
    second = HookedGPT2(GPT2Config(n_layers=1, d_model=32, n_heads=4, n_ctx=16, d_vocab=101))
    ckpt = getattr(first, save)(tmp_path / "ckpt")
    (ckpt / "state.json").write_text('{"step": 10}\n')  # what a run keeps beside the weights
    files = {path.name: path.read_bytes() for path in ckpt.iterdir()}
    with pytest.raises(CheckpointError, match="already a checkpoint .*overwrite=True"):
        getattr(second, save)(ckpt)
    assert files == {path.name: path.read_bytes() for path in ckpt.iterdir()}  # the old files, whole
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "todo.txt").write_text("keep me")
    with pytest.raises(CheckpointError, match="non-empty directory .*todo.txt"):
        getattr(second, save)(notes)
    with pytest.raises(CheckpointError, match="is a file"):
        getattr(second, save)(notes / "todo.txt", overwrite=True)
    empty = tmp_path / "empty"
    empty.mkdir()
    getattr(second, save)(empty)  # an empty directory is free
    getattr(second, save)(ckpt, overwrite=True)
    assert (ckpt / "state.json").read_text() == '{"step": 10}\n'  # overwrite replaces only what it writes
    load = HookedGPT2.from_pretrained if save == "save_pretrained" else HookedGPT2.from_hf
    assert torch.equal(load(ckpt).W_E, second.W_E)


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_every_file_of_a_checkpoint_follows_the_umask(tiny_model, tmp_path, umask):
    """safetensors creates its files 0600 whatever the umask; a checkpoint's weights must be
    as readable as the config beside them (a shared run directory, a copied checkpoint)."""
    old = os.umask(umask)
    try:
        path = tiny_model.save_pretrained(tmp_path / f"ckpt-{umask:o}")
    finally:
        os.umask(old)
    modes = {p.name: p.stat().st_mode & 0o777 for p in path.iterdir()}
    assert modes and set(modes.values()) == {0o666 & ~umask}, modes

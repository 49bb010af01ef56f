"""The demo's recipe trains to formation, and the report reads its numbers off the checkpoints.

A much smaller version of the README's main job (the demo preset and its training defaults
over a 512-token compact vocabulary of tiny-shakespeare, fewer steps) forms a previous-token
head and then an induction head. Each number the report tells the story with (the crossing,
the in-context-learning score, the head scores, K-composition, the validation loss around
the phase change) is recomputed here from the checkpoint files by hand: attention read off
``hook_pattern`` and masked by position, losses by ``torch.nn.functional.cross_entropy``,
K-composition from ``W_Q``, ``W_K``, ``W_V``, ``W_O`` and the layer-norm gains.
"""

import json

import pytest
import torch
import torch.nn.functional as F

from analyses import over_training as ot
from analyses.formation import Probes
from data_prep.compact import compact
from hooked_gpt2 import HookedGPT2
from training import rundir
from training.config import TrainConfig
from training.train import train

# What the test changes from the main job: the corpus (tiny-shakespeare, already prepared
# for the suite), the vocabulary (512 tokens instead of 2,048), 2,000 steps instead of 3,000
# (the same warm-up, a shorter cosine decay), and three repeated rows in four instead of one
# in two (the head forms sooner: docs/induction-recipe.md, fifth session).
SMALL_RECIPE = dict(max_steps=2000, repeat_fraction=0.75)


@pytest.fixture(scope="module")
def formed(shakespeare_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("demo-recipe")
    data = compact(shakespeare_data, root / "v512", 512, log=lambda *a: None)
    cfg = TrainConfig(preset="demo", data=str(data), out=str(root / "run"), eval_every=100, ckpt_every=100,
                      sample_tokens=0, progress=False, tensorboard=False, **SMALL_RECIPE)
    run = train(cfg)
    results = ot.over_training(run, log=lambda *a: None)
    ot.write_report(results, run / "analysis" / "over_training.html")
    return cfg, run, results


def by_hand(model: HookedGPT2, tokens: torch.Tensor, n: int) -> dict:
    """The probe's numbers for one checkpoint, computed without the analyses package:
    ``tokens`` is ``[BOS, r_1..r_n, r_1..r_n]``."""
    with torch.no_grad():
        logits, cache = model.run_with_cache(tokens)
    losses = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), tokens[:, 1:].flatten(), reduction="none")
    losses = losses.view(tokens.shape[0], -1)  # [batch, target position - 1]
    query = torch.arange(tokens.shape[1])
    prev, ind = [], []
    for layer in range(model.cfg.n_layers):
        pattern = cache[f"blocks.{layer}.attn.hook_pattern"]  # [batch head query key]
        # Previous token: every query from position 1 on, its key one back.
        prev.append(pattern[:, :, query[1:], query[1:] - 1].mean(dim=(0, 2)))
        # Induction: the second repetition's queries, their key the token after the earlier copy.
        second = query[n + 1 :]
        ind.append(pattern[:, :, second, second - n + 1].mean(dim=(0, 2)))
    return {"icl": (losses[:, :n].mean() - losses[:, n:].mean()).item(),
            "previous_token": torch.stack(prev), "induction": torch.stack(ind)}


def k_composition_by_hand(model: HookedGPT2, reader: int) -> torch.Tensor:
    """|W_Q^h W_K^h^T W_O^s^T W_V^s^T|_F / (|W_Q W_K^T|_F |W_V W_O|_F) with the gains folded."""
    g0, g1 = model.blocks[0].ln1.weight.detach(), model.blocks[1].ln1.weight.detach()
    scores = torch.zeros(model.cfg.n_heads)
    for source in range(model.cfg.n_heads):
        ov = (g0[:, None] * model.W_V[0, source]) @ model.W_O[0, source]  # [d_model d_model]
        qk = (g1[:, None] * model.W_Q[1, reader]) @ (g1[:, None] * model.W_K[1, reader]).T
        scores[source] = torch.linalg.norm(qk @ ov.T) / (torch.linalg.norm(qk) * torch.linalg.norm(ov))
    return scores.detach()


def test_the_small_recipe_forms_a_previous_token_then_an_induction_head(formed):
    cfg, run, results = formed
    crossing = results["crossing"]
    assert crossing is not None, "no induction head formed"
    assert crossing["head"][0] == 1 and crossing["step"] < 0.8 * cfg.max_steps, "formed, but in the last fifth"
    f = results["formation"]
    prev_steps = [s for name, s in f["previous_token_crossings"].items() if name.startswith("L0") and s is not None]
    assert prev_steps and min(prev_steps) <= crossing["step"] + cfg.ckpt_every, \
        "a layer-0 previous-token head forms with the induction head (the same phase change)"
    rows = results["checkpoints"]
    assert rows[-1]["icl"] > 2 > rows[0]["icl"] + 1, "the second repetition becomes far easier"
    assert f["loss"]["rise"] < 0.1, "the validation loss does not climb back after the head forms"


def test_the_reports_numbers_are_the_checkpoints_own(formed):
    cfg, run, results = formed
    rows = {r["step"]: r for r in results["checkpoints"]}
    checkpoints = dict(rundir.list_checkpoints(run))
    assert sorted(rows) == sorted(checkpoints)
    probes = Probes(json.loads((run / "config.json").read_text()), top=results["options"]["probe_top"])
    crossing_by_hand = None
    for step, path in sorted(checkpoints.items()):
        model = HookedGPT2.from_pretrained(path).eval()
        tokens = ot.probe_tokens(model, results["options"], probes)
        n = (tokens.shape[1] - 1) // 2
        mine, row = by_hand(model, tokens, n), rows[step]
        assert row["icl"] == pytest.approx(mine["icl"], abs=1e-4), step
        for detector in ("previous_token", "induction"):
            assert torch.allclose(torch.tensor(row["heads"][detector]), mine[detector], atol=1e-5), (step, detector)
        layer1 = mine["induction"][1]
        if crossing_by_hand is None and layer1.max() >= 0.5:
            crossing_by_hand = (step, [1, int(layer1.argmax())])
        reader = results["formation"]["induction_head"][1]
        composition = torch.tensor(row["composition"])[:, reader]
        assert torch.allclose(composition, k_composition_by_hand(model, reader), atol=1e-4), step
    assert crossing_by_hand == (results["crossing"]["step"], results["crossing"]["head"])
    # The induction head's keys read the previous-token head more after the crossing than before.
    f = results["formation"]
    source, reader = f["previous_token_head"][1], f["induction_head"][1]
    views = {v["label"]: v["step"] for v in f["views"]}
    assert rows[views["after"]]["composition"][source][reader] > rows[views["before"]]["composition"][source][reader]
    # The validation loss around the phase change is the one each checkpoint was evaluated at.
    for label in ("before", "during", "after"):
        assert f["loss"][label]["val_loss"] == rows[f["loss"][label]["step"]]["val_loss"]
    html = (run / "analysis" / "over_training.html").read_text()
    assert f"first reaches 0.5 at step {results['crossing']['step']}" in html
    assert "Validation loss:" in html and "at the crossing" in html

"""How a circuit forms: the pieces ``analyses.over_training`` adds to tell the induction story.

- ``Probes``: what the detectors and in-context-learning scores read. Random tokens are
  drawn from the run's own most frequent training tokens (a small corpus never trains
  most of GPT-2's 50,257 embeddings, and an untrained embedding can hide a formed head),
  and natural-text windows come from the run's validation split.
- ``text_icl``: Olsson et al.'s in-context-learning score on natural text, the loss late
  in the context minus the loss early in it (negative: later tokens are predicted better
  because the model uses its context).
- ``k_composition``: how much each layer-1 head's keys read what each layer-0 head
  writes (Elhage et al.'s K-composition score; TransformerLens's
  ``all_composition_scores("K")`` with the layer norms' gains folded in). An induction
  head's keys read a previous-token head's output: its K-composition with that head
  rises as the circuit forms.
- ``first_crossings``: the first checkpoint at which each head's score reaches a threshold.
- ``view_steps`` and ``attention_views``: the best induction head's attention on a repeated
  sequence before, during and after it forms.

>>> probes = Probes({"data": "data/python-stdlib", "seq_len": 64}, top=1000)  # doctest: +SKIP
>>> k_composition(model).shape  # [layer-0 head, layer-1 head]                 # doctest: +SKIP
"""

from pathlib import Path

import einops
import torch
from jaxtyping import Float, Int
from torch import Tensor

from hooked_gpt2.losses import next_token_loss

from .common import AnalysisError

EARLY_WIDTH = 5  # positions averaged for each end of the natural-text score


class Probes:
    """The run's probe tokens: ``vocab`` (ids to draw repeated random tokens from, or None
    for every id) and ``windows`` (validation text ``[n, seq_len + 1]``, or None), with
    ``description`` saying which, for the report."""

    def __init__(self, config: dict, top: int | None = 1000, n_windows: int = 64):
        from data_prep.reader import BatchLoader, ShardError, TokenDataset
        from data_prep.repeats import frequent_tokens

        self.vocab, self.windows, self.top = None, None, top
        data = config.get("data")
        has_data = bool(data) and (Path(data) / "manifest.json").is_file()
        if has_data and top:
            try:
                self.vocab = frequent_tokens(TokenDataset(data, "train"), top)
            except ShardError as e:
                raise AnalysisError(f"cannot read the run's training tokens for the probes: {e}") from None
        val = None
        if has_data:
            try:
                val = TokenDataset(data, "val")
            except ShardError:  # prepared with --val-tokens 0: no natural-text probe
                pass
        if val is not None:
            seq_len = min(config.get("seq_len") or 128, len(val) - 1)
            n = min(n_windows, (len(val) - 1) // seq_len)
            if n >= 1 and seq_len > 2 * EARLY_WIDTH:
                self.windows = BatchLoader(val, n, seq_len).next_batch()
        if self.vocab is not None:
            self.description = (f"repeated random tokens drawn from the {len(self.vocab):,} most frequent tokens "
                                "of the run's training split")
        else:
            self.description = "repeated random tokens drawn from every token id" + (
                "" if top else " (--probe-top 0)") + ("" if has_data else " (the run's data is not available)")
        self.identity = {"vocab": None if self.vocab is None else [top, int(self.vocab.sum())],
                         "windows": None if self.windows is None else list(self.windows.shape) + [int(self.windows.sum())]}


def text_icl(model, windows: Int[Tensor, "batch pos"]) -> dict:
    """Loss at the last ``EARLY_WIDTH`` target positions minus loss at the ``EARLY_WIDTH``
    positions ending a tenth of the way in, over validation windows (Olsson et al. compare
    token 500 with token 50; the same ratio on a short context)."""
    windows = windows[:, : model.cfg.n_ctx + 1].to(model.W_E.device)
    with torch.no_grad():
        losses = next_token_loss(model(windows[:, :-1]), windows, per_token=True)
    per_position = losses.mean(0)  # [target position]
    n = per_position.shape[0]
    early_end = max(EARLY_WIDTH, n // 10)
    early, late = per_position[early_end - EARLY_WIDTH : early_end].mean().item(), per_position[-EARLY_WIDTH:].mean().item()
    return {"icl_text": late - early, "icl_text_early": early, "icl_text_late": late,
            "icl_text_positions": [early_end - EARLY_WIDTH + 1, early_end, n - EARLY_WIDTH + 1, n]}


def k_composition(model, source_layer: int = 0, reader_layer: int = 1) -> Float[Tensor, "source_head reader_head"]:
    """K-composition score of every (``source_layer`` head, ``reader_layer`` head) pair:
    ``|W_QK W_OV^T|_F / (|W_QK|_F |W_OV|_F)`` with each block's layer-norm gain folded
    into the weights that read the residual stream (biases and centring are left out,
    as in TransformerLens's ``composition_scores``)."""
    if not 0 <= source_layer < reader_layer < model.cfg.n_layers:
        raise AnalysisError(f"K-composition needs source_layer < reader_layer < {model.cfg.n_layers}")
    with torch.no_grad():
        source_gain = model.blocks[source_layer].ln1.weight.float()
        reader_gain = model.blocks[reader_layer].ln1.weight.float()
        ov = einops.einsum(source_gain, model.ov_circuit(source_layer).float(), "src, head src dst -> head src dst")
        qk = einops.einsum(reader_gain, model.qk_circuit(reader_layer).float(), reader_gain,
                           "q, head q k, k -> head q k")
        product = einops.einsum(qk, ov, "reader q k, source src k -> source reader q src")
        norms = product.flatten(-2).norm(dim=-1)
        scale = ov.flatten(-2).norm(dim=-1)[:, None] * qk.flatten(-2).norm(dim=-1)[None, :]
        # A head with all-zero weights composes with nothing: 0, not 0/0.
        return torch.where(scale > 0, norms / scale.clamp_min(1e-30), 0.0).cpu()


def first_crossings(rows: list[dict], detector: str, threshold: float) -> dict[str, int | None]:
    """``"L{layer}H{head}"`` -> the first step whose ``detector`` score reaches ``threshold`` (None: never)."""
    first = {}
    for row in rows:
        for layer, scores in enumerate(row["heads"][detector]):
            for head, score in enumerate(scores):
                name = f"L{layer}H{head}"
                if first.get(name) is None:
                    first[name] = row["step"] if score >= threshold else None
    return first


def earliest(crossings: dict[str, int | None]) -> int | None:
    """The first step at which any head of ``first_crossings``' result crossed (None: none did)."""
    steps = [step for step in crossings.values() if isinstance(step, int)]
    return min(steps) if steps else None


def best_head(row: dict, detector: str, layer: int | None = None) -> tuple[int, int]:
    """The (layer, head) with the highest ``detector`` score in ``row`` (within ``layer`` if given)."""
    scores = torch.tensor(row["heads"][detector])
    if layer is not None:
        return layer, int(scores[layer].argmax())
    layer, head = divmod(int(scores.argmax()), scores.shape[1])
    return layer, head


def best_induction_head(row: dict) -> tuple[int, int]:
    """The (layer, head) with the highest induction score in ``row``, from layer 1 on in a
    model with more than one layer: a layer-0 head has no earlier head to learn the previous
    token from, so its "induction" score on the probe is a fixed-offset coincidence
    (``docs/induction-recipe.md``), not the circuit."""
    scores = torch.tensor(row["heads"]["induction"])
    first = 1 if scores.shape[0] > 1 else 0
    layer, head = divmod(int(scores[first:].argmax()), scores.shape[1])
    return layer + first, head


def view_steps(rows: list[dict], head: tuple[int, int], threshold: float) -> list[tuple[str, int]]:
    """Three checkpoints to show ``head`` at: the last before it is half-way to ``threshold``,
    the first at or above it, and the last (before, during, after). Without a crossing:
    the first, middle and last checkpoints."""
    layer, h = head
    scores = [row["heads"]["induction"][layer][h] for row in rows]
    steps = [row["step"] for row in rows]
    crossed = next((i for i, s in enumerate(scores) if s >= threshold), None)
    if crossed is None:
        return [("first", steps[0]), ("middle", steps[len(steps) // 2]), ("last", steps[-1])]
    before = max([i for i in range(crossed) if scores[i] < threshold / 2] or [0])
    return [("before", steps[before]), ("during", steps[crossed]), ("after", steps[-1])]


def loss_around(rows: list[dict], steps: dict[str, int]) -> dict | None:
    """The validation loss at each of ``steps`` (label -> step: before, during, after) and
    ``rise``: how far the last checkpoint's loss is above the lowest from the "during"
    checkpoint on (0 when the loss keeps falling after the circuit forms; Olsson et al. see
    it fall at the phase change). None without validation losses or a crossing."""
    losses = {r["step"]: r.get("val_loss") for r in rows}
    if "during" not in steps or any(losses.get(step) is None for step in steps.values()):
        return None
    after = [loss for step, loss in losses.items() if step >= steps["during"] and loss is not None]
    return {**{label: {"step": step, "val_loss": losses[step]} for label, step in steps.items()},
            "lowest_after": min(after), "rise": losses[rows[-1]["step"]] - min(after)}


def attention_views(checkpoints: dict[int, Path], steps: list[int], head: tuple[int, int],
                    tokens: Int[Tensor, "batch pos"], load) -> Float[Tensor, "view query_pos key_pos"]:
    """``head``'s attention on the first sequence of ``tokens`` at each of ``steps``."""
    layer, h = head
    patterns = []
    for step in steps:
        model = load(checkpoints[step])
        with torch.no_grad():
            _, cache = model.run_with_cache(tokens[:1], names_filter=[f"blocks.{layer}.attn.hook_pattern"])
        patterns.append(cache["pattern", layer][0, h].float().cpu())
    return torch.stack(patterns)

"""Head detectors: previous-token, duplicate-token and induction scores for every head.

Each score is the mean, over the query positions where the pattern is defined, of the
attention a head pays to the key positions the pattern names:

- previous-token: key ``q - 1`` (every query after the first);
- duplicate-token: earlier positions holding the same token as the query;
- induction: positions right after an earlier occurrence of the query's token.

On a sequence of distinct random tokens repeated twice (TransformerLens's test), the
duplicate-token key of a second-half query is ``n`` back and the induction key ``n - 1``
back, as in TransformerLens. On real text the same definitions apply to whatever repeats.

Command line: ``python -m analyses.heads --checkpoint DIR --out DIR [--text "..."]``.
"""

import einops
import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from . import cli
from .common import AnalysisError, bos_token, prompt_tokens
from .html import Page, heatmap, to_jsonable

DETECTORS = ("previous_token", "duplicate_token", "induction")


def repeated_random_tokens(
    model, seq_len: int = 20, batch: int = 8, seed: int = 0, prepend_bos: bool = True,
    vocab: Int[Tensor, " n"] | None = None,
) -> Int[Tensor, "batch pos"]:
    """``batch`` sequences of ``seq_len`` distinct random tokens, each repeated twice
    (``2 * seq_len`` tokens, plus BOS first when ``prepend_bos``). The tokens are drawn
    from ``vocab`` (for a trained model, the ids its data holds, e.g.
    ``data_prep.repeats.frequent_tokens``) or, when None, from every id but BOS.

    >>> repeated_random_tokens(model, seq_len=3, batch=1).shape
    torch.Size([1, 7])
    """
    bos = bos_token(model)
    d_vocab = model.cfg.d_vocab
    if vocab is None:
        candidates = torch.tensor([t for t in range(min(d_vocab, 50_000)) if t != bos])
    else:
        candidates = torch.as_tensor(vocab, dtype=torch.long).cpu()
        candidates = candidates[(candidates != bos) & (candidates >= 0) & (candidates < d_vocab)]
    if seq_len < 2 or seq_len > len(candidates):
        raise AnalysisError(f"seq_len must be in [2, {len(candidates)}] (distinct tokens to draw from), got {seq_len}")
    if 2 * seq_len + prepend_bos > model.cfg.n_ctx:
        raise AnalysisError(f"2 * seq_len{' + 1' if prepend_bos else ''} must fit the context of {model.cfg.n_ctx}")
    generator = torch.Generator().manual_seed(seed)
    half = torch.stack([candidates[torch.randperm(len(candidates), generator=generator)[:seq_len]] for _ in range(batch)])
    parts = ([torch.full((batch, 1), bos)] if prepend_bos else []) + [half, half]
    return torch.cat(parts, dim=1).to(model.W_E.device)


def detector_masks(tokens: Int[Tensor, "batch pos"]) -> dict[str, Bool[Tensor, "batch query_pos key_pos"]]:
    """For each detector, which (query, key) pairs it rewards attention to."""
    n_pos = tokens.shape[1]
    query = torch.arange(n_pos, device=tokens.device)[:, None]
    key = torch.arange(n_pos, device=tokens.device)[None, :]
    earlier = (key < query)[None]
    same = tokens[:, :, None] == tokens[:, None, :]  # [batch query key]
    previous = (key == query - 1)[None].expand(tokens.shape[0], -1, -1)
    duplicate = same & earlier
    # Key k follows an earlier occurrence of the query's token: tokens[k-1] == tokens[q], k <= q.
    after_same = torch.zeros_like(same)
    after_same[:, :, 1:] = same[:, :, :-1]
    induction = after_same & (key <= query)[None] & (key >= 1)[None]
    return {"previous_token": previous, "duplicate_token": duplicate, "induction": induction}


def scores_from_patterns(
    patterns: Float[Tensor, "layer batch head_index query_pos key_pos"], tokens: Int[Tensor, "batch pos"]
) -> dict[str, Float[Tensor, "layer head_index"]]:
    """Every detector's score from attention patterns already computed."""
    results = {}
    for name, mask in detector_masks(tokens.to(patterns.device)).items():
        mass = einops.einsum(
            patterns, mask.to(patterns.dtype),
            "layer batch head query key, batch query key -> layer batch head query",
        )
        defined = mask.any(-1)  # [batch query]
        if not defined.any():
            results[name] = torch.full((patterns.shape[0], patterns.shape[2]), float("nan"))
            continue
        weights = defined.to(patterns.dtype) / defined.sum()
        results[name] = einops.einsum(mass, weights, "layer batch head query, batch query -> layer head").cpu()
    return results


def head_scores(model, tokens: Int[Tensor, "batch pos"] | None = None, **random_kwargs) -> dict[str, Float[Tensor, "layer head_index"]]:
    """All three detectors' ``[layer, head]`` scores in one forward pass, on ``tokens`` or
    (when None) on ``repeated_random_tokens(model, **random_kwargs)``.

    >>> scores = head_scores(model, seed=0)
    >>> scores["induction"].shape  # [n_layers n_heads]
    torch.Size([2, 4])
    """
    if tokens is None:
        tokens = repeated_random_tokens(model, **random_kwargs)
    tokens = model.check_tokens(tokens)
    with torch.no_grad():  # no gradient wanted: no graph kept
        _, cache = model.run_with_cache(tokens, names_filter=lambda name: name.endswith("hook_pattern"))
    patterns = torch.stack([cache["pattern", layer] for layer in range(model.cfg.n_layers)])
    return scores_from_patterns(patterns, tokens)


def induction_scores(model, tokens=None, **random_kwargs) -> Float[Tensor, "layer head_index"]:
    """Induction score per head (see ``head_scores`` for the arguments)."""
    return head_scores(model, tokens, **random_kwargs)["induction"]


def previous_token_scores(model, tokens=None, **random_kwargs) -> Float[Tensor, "layer head_index"]:
    """Previous-token score per head (see ``head_scores`` for the arguments)."""
    return head_scores(model, tokens, **random_kwargs)["previous_token"]


def duplicate_token_scores(model, tokens=None, **random_kwargs) -> Float[Tensor, "layer head_index"]:
    """Duplicate-token score per head (see ``head_scores`` for the arguments)."""
    return head_scores(model, tokens, **random_kwargs)["duplicate_token"]


def add_to_page(page: Page, scores: dict[str, Tensor], title: str) -> None:
    page.add_heading(title)
    n_layers, n_heads = next(iter(scores.values())).shape
    for name, value in scores.items():
        fig = heatmap(value, x=[f"H{h}" for h in range(n_heads)], y=[f"L{l}" for l in range(n_layers)],
                      title=f"{name.replace('_', '-')} score", xlabel="head", ylabel="layer",
                      text=[[f"{v:.2f}" for v in row] for row in value.tolist()], diverging=False)
        fig.update_traces(zmin=0, zmax=1)
        page.add_plotly(fig)


def main(argv=None) -> int:
    p = cli.parser("analyses.heads", "Previous-token, duplicate-token and induction scores for every head.", prompt=False)
    p.add_argument("--seq-len", type=int, default=20, help="length of the random sequence that is repeated")
    p.add_argument("--batch", type=int, default=8, help="number of repeated random sequences")
    p.add_argument("--seed", type=int, default=0, help="seed for the random tokens")
    p.add_argument("--text", default=None, help="real text to score heads on as well (optional)")
    args = p.parse_args(argv)
    model = cli.load_model(args.checkpoint, args.device)
    out = cli.out_dir(args.out)
    results = {"repeated_random": head_scores(model, seq_len=args.seq_len, batch=args.batch, seed=args.seed)}
    if args.text is not None:
        results["text"] = head_scores(model, prompt_tokens(model, args.text))
    page = Page(f"Head detectors: {args.checkpoint}")
    add_to_page(page, results["repeated_random"], f"Repeated random tokens ({args.batch} x 2 x {args.seq_len})")
    if "text" in results:
        add_to_page(page, results["text"], "Real text")
    return cli.finish(out, page.save, {"args": vars(args), "scores": to_jsonable(results)})


if __name__ == "__main__":
    cli.run(main)

"""Activation patching and attribution patching.

Run the corrupted prompt, patch in activations from the clean run, and measure a metric
(by default the logit difference between two answers at the last position). Results are
normalised so that 1 means "as clean" and 0 means "as corrupted":
``(patched - corrupted) / (clean - corrupted)``.

The sweeps batch their patched runs: each copy of the corrupted batch in one forward pass
carries a different patch, and the clean activations come from one cached clean run. A
patched run starts at its patched block from the corrupted run's cached residual stream
(the blocks below cannot change), and unembeds only the positions the metric reads.

Attribution patching approximates every patch at once from one forward and backward pass
on the corrupted prompt: ``(clean - corrupted) . d metric / d activation``, summed over the
patched elements.

Command line: ``python -m analyses.patching --checkpoint DIR --clean ... --corrupted ...
--answer ' Mary' --wrong ' John' --out DIR``.
"""

from collections import defaultdict
from dataclasses import dataclass

import torch
from jaxtyping import Float, Int
from torch import Tensor

from . import cli
from .common import AnalysisError, Metric, logit_diff, prompt_tokens, reads_last, single_token
from .html import Page, heatmap, to_jsonable

# kind -> (activation short name, what one patch covers)
KINDS = {
    "resid_pre": ("resid_pre", "pos"),
    "attn_out": ("attn_out", "pos"),
    "mlp_out": ("mlp_out", "pos"),
    "head_out": ("z", "head"),  # a head's output is z @ W_O: patching z patches it
    "head_out_by_pos": ("z", "pos_head"),
    "q": ("q", "head"),
    "k": ("k", "head"),
    "v": ("v", "head"),
    "pattern": ("pattern", "pattern_head"),
}


@dataclass(frozen=True)
class Patch:
    """Replace ``activation[:, *index]`` at ``hook_name`` with the clean run's values."""

    hook_name: str
    index: tuple = ()


def check_pair(model, clean: Tensor, corrupted: Tensor) -> tuple[Tensor, Tensor]:
    clean, corrupted = model.check_tokens(clean), model.check_tokens(corrupted)
    if clean.shape != corrupted.shape:
        raise AnalysisError(
            f"clean and corrupted prompts must have the same number of tokens, got {clean.shape[1]} "
            f"and {corrupted.shape[1]} (batch {clean.shape[0]} and {corrupted.shape[0]}); reword one so they align"
        )
    return clean, corrupted


def default_kinds(model) -> list[str]:
    return [k for k in KINDS if not (k == "mlp_out" and model.cfg.attn_only)]


def _check_kinds(model, kinds) -> list[str]:
    kinds = default_kinds(model) if kinds is None else list(kinds)
    for kind in kinds:
        if kind not in default_kinds(model):
            raise AnalysisError(f"unknown patching kind {kind!r} for this model; choose from {default_kinds(model)}")
    return kinds


def patches_for(model, kind: str, n_pos: int) -> tuple[list[Patch], tuple[int, ...]]:
    """Every patch a sweep of ``kind`` makes, and the shape its results take."""
    short, cover = KINDS[kind]
    L, H = model.cfg.n_layers, model.cfg.n_heads
    name = lambda layer: model_hook_name(short, layer)  # noqa: E731
    if cover == "pos":
        return [Patch(name(l), (p,)) for l in range(L) for p in range(n_pos)], (L, n_pos)
    if cover == "head":
        return [Patch(name(l), (slice(None), h)) for l in range(L) for h in range(H)], (L, H)
    if cover == "pos_head":
        return [Patch(name(l), (p, h)) for l in range(L) for p in range(n_pos) for h in range(H)], (L, n_pos, H)
    return [Patch(name(l), (h,)) for l in range(L) for h in range(H)], (L, H)


def model_hook_name(short: str, layer: int) -> str:
    from hooked_gpt2.cache import get_act_name

    return get_act_name(short, layer)


def start_layer(model, hook_name: str) -> int | None:
    """The first block a patch at ``hook_name`` can change (``n_layers``: only the final
    layer norm and unembedding); None for the embeddings, which only a full run reaches."""
    parts = hook_name.split(".")
    if parts[0] == "blocks":
        return int(parts[1])
    return model.cfg.n_layers if parts[0] in ("ln_final", "unembed") else None


def residual_names(model) -> list[str]:
    """The hooks whose values a patched run starts from: the stream entering each block,
    and leaving the last one (what the final layer norm reads)."""
    return [model_hook_name("resid_pre", l) for l in range(model.cfg.n_layers)] + [
        model_hook_name("resid_post", model.cfg.n_layers - 1)]


def corrupted_residuals(model, corrupted: Int[Tensor, "batch pos"]) -> dict[str, Tensor]:
    """The corrupted run's residual stream at every block boundary (``residual_names``)."""
    return model.run_with_cache(corrupted, names_filter=residual_names(model), return_cache_object=False)[1]


def forward_from(model, resid: Float[Tensor, "batch pos d_model"], layer: int,
                 last: int | None = None) -> Float[Tensor, "batch pos d_vocab"]:
    """The logits from the residual stream entering block ``layer`` (the model's forward
    after its first ``layer`` blocks); with ``last``, only those of the last ``last``
    positions (layer norm and unembedding act per position, so they are the same numbers)."""
    for block in model.blocks[layer:]:
        resid = block(resid)
    if last is not None:
        resid = resid[:, -last:]
    return model.unembed(model.ln_final(resid))


def run_patched(
    model, corrupted: Int[Tensor, "batch pos"], clean_cache, metric: Metric, patch_groups: list[list[Patch]],
    max_copies: int = 32, corrupted_cache: dict[str, Tensor] | None = None, reuse: bool = True,
) -> Float[Tensor, "run"]:
    """The metric for each group of patches (applied together), batching up to
    ``max_copies`` patched copies of the corrupted batch into one forward pass.

    A patch at block L cannot change blocks below L, so with ``reuse`` (the default) each
    patched run starts at its first patched block from the corrupted run's residual
    stream there (``corrupted_cache``, computed once if not given), and only the last
    positions ``metric`` reads (``common.reads_last``) are unembedded. ``reuse=False``
    recomputes every patched run from the tokens: the same numbers, for checking.

    >>> _, clean_cache = model.run_with_cache(clean)
    >>> values = run_patched(model, corrupted, clean_cache, metric, [[Patch("blocks.1.hook_resid_pre", (3,))]])
    >>> values.shape
    torch.Size([1])
    """
    corrupted = model.check_tokens(corrupted)
    batch = corrupted.shape[0]
    plan = run_plan(model, patch_groups, max_copies, reuse)
    if corrupted_cache is None and any(start is not None for start, _ in plan):
        corrupted_cache = corrupted_residuals(model, corrupted)
    values: list[float] = [0.0] * len(patch_groups)
    for start, chunk in plan:
        groups = [patch_groups[i] for i in chunk]
        logits = _run_chunk(model, corrupted, clean_cache, corrupted_cache, groups, start,
                            chunk_reads_last(model, metric, groups) if reuse else None)
        for i, copy_logits in zip(chunk, logits.split(batch)):
            values[i] = float(metric(copy_logits))
    return torch.tensor(values, dtype=torch.float64)


def run_plan(model, patch_groups: list[list[Patch]], max_copies: int = 32,
             reuse: bool = True) -> list[tuple[int | None, list[int]]]:
    """The batched forwards ``run_patched`` makes: (first block, indices of the groups it
    carries). Groups that start at the same block share forwards; None starts at the tokens."""
    by_start: dict[int | None, list[int]] = defaultdict(list)
    for i, group in enumerate(patch_groups):
        by_start[_group_start(model, group) if reuse else None].append(i)
    return [(start, indices[first : first + max_copies])
            for start, indices in by_start.items() for first in range(0, len(indices), max_copies)]


def chunk_reads_last(model, metric: Metric, groups: list[list[Patch]]) -> int | None:
    """The last positions to unembed for ``groups``: the metric's, unless a patch acts
    after the last block (on every position's final stream)."""
    after_blocks = any(start_layer(model, p.hook_name) == model.cfg.n_layers for g in groups for p in g)
    return None if after_blocks else reads_last(metric)


def _group_start(model, group: list[Patch]) -> int | None:
    starts = [start_layer(model, patch.hook_name) for patch in group]
    return None if not starts or None in starts else min(starts)


def _run_chunk(model, corrupted, clean_cache, corrupted_cache, chunk: list[list[Patch]], start: int | None,
               last: int | None) -> Tensor:
    """One batched forward: copy i of the corrupted batch carries ``chunk[i]``'s patches."""
    batch = corrupted.shape[0]
    by_name: dict[str, list[tuple[int, tuple]]] = defaultdict(list)
    for copy, group in enumerate(chunk):
        for patch in group:
            by_name[patch.hook_name].append((copy, patch.index))

    def patch_hook(activation, hook):
        activation = activation.clone()
        clean = clean_cache[hook.name]
        for copy, index in by_name[hook.name]:
            rows = slice(copy * batch, (copy + 1) * batch)
            activation[rows][(slice(None), *index)] = clean[(slice(None), *index)]
        return activation

    with torch.no_grad(), model.hooks(fwd_hooks=[(name, patch_hook) for name in by_name]):
        if start is None:
            return model(corrupted.repeat(len(chunk), 1))
        name = residual_names(model)[start]
        return forward_from(model, corrupted_cache[name].repeat(len(chunk), 1, 1), start, last)


@dataclass
class Baseline:
    clean_cache: object
    clean: float  # metric on the clean run
    corrupted: float  # metric on the corrupted run
    corrupted_cache: dict | None = None  # the corrupted run's residual stream (residual_names)

    def normalise(self, values: Tensor) -> Tensor:
        return (values - self.corrupted) / (self.clean - self.corrupted)


def baseline(model, clean: Tensor, corrupted: Tensor, metric: Metric, clean_cache=None) -> Baseline:
    """The clean cache and the metric's clean and corrupted values (1 and 0 after normalising)."""
    clean, corrupted = check_pair(model, clean, corrupted)
    if clean_cache is None:
        with torch.no_grad():  # no gradient wanted: no graph kept
            clean_logits, clean_cache = model.run_with_cache(clean)
    else:
        with torch.no_grad():
            clean_logits = model(clean)
    corrupted_logits, corrupted_cache = model.run_with_cache(
        corrupted, names_filter=residual_names(model), return_cache_object=False)
    value_clean, value_corrupted = float(metric(clean_logits)), float(metric(corrupted_logits))
    if abs(value_clean - value_corrupted) < 1e-6 * max(1.0, abs(value_clean)):
        raise AnalysisError(
            f"the metric is the same on the clean and corrupted prompts ({value_clean:.4g}), so patching "
            "cannot be normalised; choose a corruption that changes the answer"
        )
    return Baseline(clean_cache, value_clean, value_corrupted, corrupted_cache)


def patch_effect(model, clean, corrupted, metric: Metric, patches: list[Patch], base: Baseline | None = None) -> float:
    """The normalised metric with ``patches`` applied together (an empty list gives 0.0).

    >>> round(patch_effect(model, clean, corrupted, metric, [Patch("blocks.0.hook_resid_pre")]), 4)
    1.0
    """
    base = base or baseline(model, clean, corrupted, metric)
    value = run_patched(model, corrupted, base.clean_cache, metric, [patches], corrupted_cache=base.corrupted_cache)
    return float(base.normalise(value)[0])


def activation_patching(
    model, clean: Int[Tensor, "batch pos"], corrupted: Int[Tensor, "batch pos"], metric: Metric | None = None,
    answer: str | int | None = None, wrong: str | int | None = None, kinds=None, clean_cache=None,
    max_copies: int = 32,
) -> dict[str, Tensor]:
    """Normalised patching results for each kind in ``kinds`` (all by default): ``resid_pre``,
    ``attn_out``, ``mlp_out`` as [layer pos]; ``head_out``, ``q``, ``k``, ``v``, ``pattern``
    as [layer head]; ``head_out_by_pos`` as [layer pos head].

    ``metric`` defaults to ``logit_diff(answer, wrong)`` at the last position.

    >>> results = activation_patching(model, clean, corrupted, answer=" Mary", wrong=" John", kinds=["resid_pre", "q"])
    >>> results["resid_pre"].shape  # [n_layers n_pos]
    torch.Size([2, 15])
    """
    metric = _resolve_metric(model, metric, answer, wrong)
    base = baseline(model, clean, corrupted, metric, clean_cache)
    n_pos = model.check_tokens(clean).shape[1]
    results = {}
    for kind in _check_kinds(model, kinds):
        patches, shape = patches_for(model, kind, n_pos)
        values = run_patched(model, corrupted, base.clean_cache, metric, [[p] for p in patches], max_copies,
                             base.corrupted_cache)
        results[kind] = base.normalise(values).reshape(shape)
    return results


def attribute_patches(
    model, clean: Int[Tensor, "batch pos"], corrupted: Int[Tensor, "batch pos"], metric: Metric, patches: list[Patch],
) -> Float[Tensor, "patch"]:
    """Attribution patching for any list of patches (each applied alone), normalised like
    ``patch_effect``: ``(clean - corrupted) . grad`` summed over each patch's elements."""
    clean, corrupted = check_pair(model, clean, corrupted)
    names = sorted({p.hook_name for p in patches})
    with torch.no_grad():  # no gradient wanted: no graph kept
        clean_logits, clean_cache = model.run_with_cache(clean, names_filter=names)
    corrupted_logits, corrupted_cache = model.run_with_cache(corrupted, names_filter=names, incl_bwd=True, metric=metric)
    value_clean, value_corrupted = float(metric(clean_logits)), float(metric(corrupted_logits.detach()))
    if abs(value_clean - value_corrupted) < 1e-6 * max(1.0, abs(value_clean)):
        raise AnalysisError("the metric is the same on the clean and corrupted prompts; choose a corruption that changes the answer")
    deltas = {
        name: (clean_cache[name] - corrupted_cache[name]) * corrupted_cache[name + "_grad"] for name in names
    }
    values = torch.stack([deltas[p.hook_name][(slice(None), *p.index)].sum() for p in patches])
    return (values / (value_clean - value_corrupted)).cpu()


def attribution_patching(
    model, clean: Int[Tensor, "batch pos"], corrupted: Int[Tensor, "batch pos"], metric: Metric | None = None,
    answer: str | int | None = None, wrong: str | int | None = None, kinds=None,
) -> dict[str, Tensor]:
    """The linear approximation of ``activation_patching`` (same keys and shapes), from one
    clean forward pass and one corrupted forward and backward pass.

    >>> approx = attribution_patching(model, clean, corrupted, answer=" Mary", wrong=" John")
    """
    metric = _resolve_metric(model, metric, answer, wrong)
    clean, corrupted = check_pair(model, clean, corrupted)
    sweeps = {kind: patches_for(model, kind, clean.shape[1]) for kind in _check_kinds(model, kinds)}
    every = [p for patches, _ in sweeps.values() for p in patches]
    values = attribute_patches(model, clean, corrupted, metric, every).split([len(p) for p, _ in sweeps.values()])
    return {kind: v.reshape(shape) for (kind, (_, shape)), v in zip(sweeps.items(), values)}


def agreement(real: dict[str, Tensor], approx: dict[str, Tensor]) -> dict[str, dict[str, float]]:
    """Per kind: the correlation and largest absolute difference between real and
    attribution patching."""
    out = {}
    for kind in real.keys() & approx.keys():
        a, b = real[kind].flatten().double(), approx[kind].flatten().double()
        corr = torch.corrcoef(torch.stack([a, b]))[0, 1] if a.std() > 0 and b.std() > 0 else torch.tensor(float("nan"))
        out[kind] = {"correlation": float(corr), "max_abs_diff": float((a - b).abs().max())}
    return {k: out[k] for k in real if k in out}


def _resolve_metric(model, metric, answer, wrong) -> Metric:
    if metric is not None:
        return metric
    if answer is None:
        raise AnalysisError("give a metric, or an answer token (and optionally a wrong one) for the logit difference")
    return logit_diff(single_token(model, answer), None if wrong is None else single_token(model, wrong))


def add_to_page(page: Page, results: dict[str, Tensor], str_tokens: list[str], title: str) -> None:
    page.add_heading(title)
    positions = [f"{i}: {t!r}" for i, t in enumerate(str_tokens)]
    for kind, value in results.items():
        L = value.shape[0]
        layers = [f"L{l}" for l in range(L)]
        if value.dim() == 3:  # [layer pos head]: one row per (layer, head)
            value = value.permute(0, 2, 1).reshape(-1, value.shape[1])
            fig = heatmap(value, x=positions, y=[f"L{l}H{h}" for l in range(L) for h in range(value.shape[0] // L)],
                          title=f"{kind} (1 = clean, 0 = corrupted)", xlabel="position", ylabel="head")
        elif KINDS[kind][1] == "pos":
            fig = heatmap(value, x=positions, y=layers, title=f"{kind} (1 = clean, 0 = corrupted)", xlabel="position", ylabel="layer")
        else:
            fig = heatmap(value, x=[f"H{h}" for h in range(value.shape[1])], y=layers,
                          title=f"{kind} (1 = clean, 0 = corrupted)", xlabel="head", ylabel="layer",
                          text=[[f"{v:.2f}" for v in row] for row in value.tolist()])
        page.add_plotly(fig)


def main(argv=None) -> int:
    p = cli.parser("analyses.patching", "Activation patching and attribution patching from a corrupted prompt to a clean one.", prompt=False)
    p.add_argument("--clean", default="When John and Mary went to the store, John gave a drink to",
                   help="the clean prompt")
    p.add_argument("--corrupted", default="When John and Mary went to the store, Mary gave a drink to",
                   help="the corrupted prompt (same number of tokens as --clean)")
    p.add_argument("--answer", default=" Mary", help="the clean run's answer token (a single token)")
    p.add_argument("--wrong", default=" John", help="the competing answer token for the logit difference")
    p.add_argument("--kinds", default=None, help=f"comma-separated subset of {','.join(KINDS)} (default: all)")
    args = p.parse_args(argv)
    model = cli.load_model(args.checkpoint, args.device)
    clean, corrupted = prompt_tokens(model, args.clean), prompt_tokens(model, args.corrupted)
    kinds = None if args.kinds is None else [k.strip() for k in args.kinds.split(",") if k.strip()]
    metric = logit_diff(single_token(model, args.answer), single_token(model, args.wrong))
    check_pair(model, clean, corrupted)
    out = cli.out_dir(args.out)
    real = activation_patching(model, clean, corrupted, metric, kinds=kinds)
    approx = attribution_patching(model, clean, corrupted, metric, kinds=kinds)
    agree = agreement(real, approx)
    page = Page(f"Activation patching: {args.checkpoint}")
    page.add_text(f"clean: {args.clean!r}; corrupted: {args.corrupted!r}; metric: logit({args.answer!r}) - logit({args.wrong!r}) at the last position")
    add_to_page(page, real, model.to_str_tokens(clean), "Activation patching")
    add_to_page(page, approx, model.to_str_tokens(clean), "Attribution patching (linear approximation)")
    page.add_heading("Agreement of attribution patching with activation patching")
    page.add_table(["kind", "correlation", "max |difference|"], [[k, v["correlation"], v["max_abs_diff"]] for k, v in agree.items()])
    return cli.finish(out, page.save, {"args": vars(args), "activation_patching": to_jsonable(real),
                                          "attribution_patching": to_jsonable(approx), "agreement": agree})


if __name__ == "__main__":
    cli.run(main)

"""Head and MLP ablation: zero, mean and resample.

Ablating a head replaces its ``z`` (so its output ``z @ W_O``) with zeros, with its mean
over a reference batch (and over positions), or with its value on another sequence of the
reference batch (resampling). The attention output bias ``b_O`` belongs to no head and is
never ablated: zero-ablating every head of a layer leaves ``b_O`` in ``attn_out``. An MLP
is ablated through its whole output ``mlp_out`` (bias included).

The effect is ``metric(ablated) - metric(clean)``, the metric being the mean next-token
loss unless given. Sweeps run one forward pass per layer, with one copy of the batch per
head.

Command line: ``python -m analyses.ablation --checkpoint DIR --out DIR [--heads 0.1,1.3]``.
"""

from dataclasses import dataclass

import torch
from jaxtyping import Float, Int
from torch import Tensor

from . import cli
from .common import AnalysisError, Metric, bos_token, mean_loss, parse_heads, prompt_tokens
from .html import Page, heatmap, to_jsonable

METHODS = ("zero", "mean", "resample")


@dataclass
class Reference:
    """What mean and resample ablation replace activations with, from a reference batch."""

    z: dict[int, Tensor]  # layer -> [ref_batch pos head_index d_head]
    mlp_out: dict[int, Tensor]  # layer -> [ref_batch pos d_model]


def reference_activations(model, reference_tokens: Int[Tensor, "batch pos"]) -> Reference:
    names = lambda n: n.endswith("attn.hook_z") or n.endswith("hook_mlp_out")  # noqa: E731
    with torch.no_grad():  # no gradient wanted: no graph kept
        _, cache = model.run_with_cache(model.check_tokens(reference_tokens), names_filter=names)
    L = model.cfg.n_layers
    mlp = {} if model.cfg.attn_only else {l: cache["mlp_out", l] for l in range(L)}
    return Reference({l: cache["z", l] for l in range(L)}, mlp)


def _replacement(method: str, ref: Tensor, like: Tensor, seed: int) -> Tensor:
    """What replaces ``like`` ([batch pos ...]) under ``method``, from reference ``ref``."""
    if method == "zero":
        return torch.zeros_like(like)
    if method == "mean":
        return ref.mean(dim=(0, 1), keepdim=True).expand_as(like)
    if method == "resample":
        if ref.shape[1] < like.shape[1]:
            raise AnalysisError(f"resample ablation needs reference sequences at least {like.shape[1]} tokens long")
        generator = torch.Generator().manual_seed(seed)
        rows = torch.randint(ref.shape[0], (like.shape[0],), generator=generator)
        return ref[rows.to(ref.device), : like.shape[1]]
    raise AnalysisError(f"unknown ablation method {method!r}; choose from {', '.join(METHODS)}")


def ablation_hooks(model, heads=(), mlps=(), method: str = "zero", reference: Reference | None = None, seed: int = 0):
    """Forward hooks that ablate ``heads`` ((layer, head) pairs) and ``mlps`` (layers) together,
    for ``model.hooks`` / ``run_with_hooks``.

    >>> with model.hooks(fwd_hooks=ablation_hooks(model, heads=[(0, 1)])):
    ...     loss = model.loss(tokens)
    """
    if method != "zero" and reference is None:
        raise AnalysisError(f"{method} ablation needs a reference batch (reference_activations)")
    by_layer: dict[int, list[int]] = {}
    for layer, head in heads:
        by_layer.setdefault(layer, []).append(head)
    hooks = []
    for layer, layer_heads in by_layer.items():

        def ablate_z(z, hook, layer=layer, layer_heads=layer_heads):
            ref = reference.z[layer] if reference is not None else None
            new = _replacement(method, ref, z, seed)
            z = z.clone()
            z[:, :, layer_heads] = new[:, :, layer_heads]
            return z

        hooks.append((f"blocks.{layer}.attn.hook_z", ablate_z))
    for layer in mlps:
        if model.cfg.attn_only:
            raise AnalysisError("this model is attention-only: it has no MLPs to ablate")

        def ablate_mlp(out, hook, layer=layer):
            return _replacement(method, reference.mlp_out[layer] if reference is not None else None, out, seed)

        hooks.append((f"blocks.{layer}.hook_mlp_out", ablate_mlp))
    return hooks


def ablate(model, tokens, heads=(), mlps=(), method="zero", metric: Metric | None = None,
           reference_tokens=None, seed: int = 0) -> float:
    """The metric (mean loss by default) with ``heads`` and ``mlps`` ablated together.

    >>> loss = ablate(model, tokens, heads=[(0, 1), (1, 3)], method="mean")
    """
    tokens = model.check_tokens(tokens)
    metric = metric or mean_loss(tokens)
    reference = None if method == "zero" else reference_activations(model, _reference(tokens, reference_tokens))
    with torch.no_grad(), model.hooks(fwd_hooks=ablation_hooks(model, heads, mlps, method, reference, seed)):
        return float(metric(model(tokens)))


def _reference(tokens: Tensor, reference_tokens) -> Tensor:
    return tokens if reference_tokens is None else reference_tokens


@dataclass
class AblationResult:
    heads: Float[Tensor, "layer head_index"]  # metric(ablated) - metric(clean)
    mlps: Float[Tensor, "layer"] | None
    clean: float  # the metric without ablation


def head_ablation(
    model, tokens: Int[Tensor, "batch pos"], method: str = "zero", metric: Metric | None = None,
    reference_tokens: Int[Tensor, "batch pos"] | None = None, seed: int = 0, include_mlps: bool = True,
) -> AblationResult:
    """The effect on the metric (mean next-token loss by default; any function of the
    logits returning a scalar) of ablating each head, and each MLP, alone.

    Mean and resample ablation draw on ``reference_tokens`` (``tokens`` by default).

    >>> result = head_ablation(model, tokens, method="zero")
    >>> result.heads.shape  # [n_layers n_heads]
    torch.Size([2, 4])
    """
    if method not in METHODS:
        raise AnalysisError(f"unknown ablation method {method!r}; choose from {', '.join(METHODS)}")
    tokens = model.check_tokens(tokens)
    metric = metric or mean_loss(tokens)
    batch, H, L = tokens.shape[0], model.cfg.n_heads, model.cfg.n_layers
    reference = None if method == "zero" else reference_activations(model, _reference(tokens, reference_tokens))
    with torch.no_grad():
        clean = float(metric(model(tokens)))
        effects = torch.zeros(L, H)
        for layer in range(L):
            # One copy of the batch per head, each with its own head ablated.
            def ablate_each(z, hook, layer=layer):
                ref = reference.z[layer] if reference is not None else None
                new = _replacement(method, ref, z[:batch], seed)
                z = z.clone()
                for h in range(H):
                    z[h * batch : (h + 1) * batch, :, h] = new[:, :, h]
                return z

            logits = model.run_with_hooks(tokens.repeat(H, 1), fwd_hooks=[(f"blocks.{layer}.attn.hook_z", ablate_each)])
            effects[layer] = torch.tensor([float(metric(chunk)) - clean for chunk in logits.split(batch)])
        mlps = None
        if include_mlps and not model.cfg.attn_only:
            mlps = torch.tensor([
                ablate(model, tokens, mlps=[l], method=method, metric=metric, reference_tokens=reference_tokens, seed=seed) - clean
                for l in range(L)
            ])
    return AblationResult(effects, mlps, clean)


def add_to_page(page: Page, results: dict[str, AblationResult], title: str) -> None:
    page.add_heading(title)
    for method, result in results.items():
        L, H = result.heads.shape
        page.add_plotly(heatmap(
            result.heads, x=[f"H{h}" for h in range(H)], y=[f"L{l}" for l in range(L)],
            title=f"{method} ablation: change in metric (clean {result.clean:.3f})", xlabel="head", ylabel="layer",
            text=[[f"{v:+.3f}" for v in row] for row in result.heads.tolist()],
        ))
        if result.mlps is not None:
            page.add_plotly(heatmap(
                result.mlps[:, None], x=["MLP"], y=[f"L{l}" for l in range(L)], title=f"{method} ablation of each MLP",
                text=[[f"{v:+.3f}"] for v in result.mlps.tolist()], ylabel="layer",
            ))


def main(argv=None) -> int:
    p = cli.parser("analyses.ablation", "Zero, mean and resample ablation of every head and MLP: the change in loss.")
    p.add_argument("--methods", default="zero,mean,resample", help="comma-separated ablation methods")
    p.add_argument("--heads", default=None, help="also ablate these heads together, e.g. 0.1,1.3 (LAYER.HEAD)")
    p.add_argument("--reference-seed", type=int, default=0,
                   help="seed for the reference batch (repeated random tokens as long as the prompt) and resampling")
    p.add_argument("--reference-batch", type=int, default=8, help="number of reference sequences for mean/resample ablation")
    args = p.parse_args(argv)
    model = cli.load_model(args.checkpoint, args.device)
    tokens = prompt_tokens(model, args.prompt)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    for m in methods:
        if m not in METHODS:
            raise AnalysisError(f"unknown ablation method {m!r}; choose from {', '.join(METHODS)}")
    together = parse_heads(model, args.heads) if args.heads else []
    out = cli.out_dir(args.out)
    reference = reference_batch(model, tokens.shape[1], args.reference_batch, args.reference_seed)
    results = {m: head_ablation(model, tokens, m, reference_tokens=reference, seed=args.reference_seed) for m in methods}
    page = Page(f"Ablation: {args.checkpoint}")
    page.add_text(f"prompt: {args.prompt!r}; metric: mean next-token loss; values are ablated minus clean")
    add_to_page(page, results, "Each head and MLP ablated alone")
    joint = {}
    if together:
        joint = {m: ablate(model, tokens, heads=together, method=m, reference_tokens=reference, seed=args.reference_seed)
                 for m in methods}
        page.add_heading("Heads ablated together")
        page.add_table(["method", "heads", "loss", "change"],
                       [[m, args.heads, v, v - results[m].clean] for m, v in joint.items()])
    return cli.finish(out, page.save, {
        "args": vars(args),
        "ablation": {m: {"heads": to_jsonable(r.heads), "mlps": to_jsonable(r.mlps), "clean": r.clean} for m, r in results.items()},
        "together": joint,
    })


def reference_batch(model, n_pos: int, batch: int, seed: int) -> Tensor:
    """Random token sequences of ``n_pos`` tokens (BOS first) for mean and resample ablation."""
    generator = torch.Generator().manual_seed(seed + 1)
    tokens = torch.randint(model.cfg.d_vocab, (batch, n_pos), generator=generator)
    tokens[:, 0] = bos_token(model)
    return tokens.to(model.W_E.device)


if __name__ == "__main__":
    cli.run(main)

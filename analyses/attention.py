"""Attention visualisation: circuitsvis patterns for every head of the chosen layers.

The page inlines circuitsvis's bundle once (see ``analyses.html``); circuitsvis's own
``str()`` would load it from a CDN and its ``_repr_html_`` probes the internet.

Command line: ``python -m analyses.attention --checkpoint DIR --out DIR --prompt "..." --layers 0,1``.
"""

import torch
from jaxtyping import Float, Int
from torch import Tensor

from . import cli
from .common import AnalysisError, check_layer, parse_layers, prompt_tokens
from .html import Page, to_jsonable


def attention_patterns(
    model, tokens: Int[Tensor, "batch pos"], layers: list[int] | None = None, cache=None
) -> dict[int, Float[Tensor, "head_index query_pos key_pos"]]:
    """Each chosen layer's attention patterns for the first sequence of ``tokens``.

    >>> patterns = attention_patterns(model, model.to_tokens("Hello world"), layers=[0])
    >>> patterns[0].shape  # [n_heads pos pos]
    torch.Size([4, 3, 3])
    """
    tokens = model.check_tokens(tokens)
    layers = list(range(model.cfg.n_layers)) if layers is None else [check_layer(model, l) for l in layers]
    if cache is None:
        names = [f"blocks.{l}.attn.hook_pattern" for l in layers]
        with torch.no_grad():  # no gradient wanted: no graph kept
            _, cache = model.run_with_cache(tokens[:1], names_filter=names)
    cached = cache["pattern", layers[0]].shape[-1] if layers else tokens.shape[1]
    if cached != tokens.shape[1]:  # a cache of another prompt would be drawn under these labels
        raise AnalysisError(f"the cache holds a run of {cached} tokens but tokens has {tokens.shape[1]}: "
                            "pass the tokens the cache was run on")
    return {l: cache["pattern", l][0].cpu() for l in layers}


def add_to_page(page: Page, str_tokens: list[str], patterns: dict[int, Tensor], title: str = "Attention patterns") -> None:
    """One circuitsvis ``AttentionHeads`` view per layer."""
    page.add_heading(title)
    for layer, pattern in patterns.items():
        if pattern.shape[-1] != len(str_tokens):
            raise AnalysisError(f"layer {layer}'s pattern covers {pattern.shape[-1]} tokens but {len(str_tokens)} "
                                "labels were given: label it with the tokens it was computed on")
        page.add_heading(f"Layer {layer}", level=3)
        page.add_circuitsvis(
            "AttentionHeads", attention=pattern.float().numpy(), tokens=str_tokens,
            attentionHeadNames=[f"L{layer}H{h}" for h in range(pattern.shape[0])], maskUpperTri=True,
        )


def main(argv=None) -> int:
    p = cli.parser("analyses.attention", "Attention patterns of every head in the chosen layers (circuitsvis, offline).")
    p.add_argument("--layers", default="all", help="comma-separated layers to show, or 'all'")
    args = p.parse_args(argv)
    model = cli.load_model(args.checkpoint, args.device)
    tokens = prompt_tokens(model, args.prompt)
    layers = parse_layers(model, args.layers)
    out = cli.out_dir(args.out)
    patterns = attention_patterns(model, tokens, layers)
    page = Page(f"Attention: {args.checkpoint}")
    page.add_text(f"prompt: {args.prompt!r}")
    add_to_page(page, model.to_str_tokens(tokens[0]), patterns)
    return cli.finish(out, page.save, {"args": vars(args), "tokens": model.to_str_tokens(tokens[0]),
                                          "patterns": to_jsonable(patterns)})


if __name__ == "__main__":
    cli.run(main)

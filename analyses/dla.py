"""Direct logit attribution: each head's and each MLP's direct contribution to a logit.

The final residual stream is split into embeddings, every head's output, every MLP's
output and the attention output biases (plus a remainder that is zero up to rounding);
each component goes through ``ln_final`` as a linear map (the cached scale of the full
stream) and is dotted with the answer's unembedding (minus the wrong answer's). With
the layer norm bias's own term, the contributions sum to the logit (difference).

Command line: ``python -m analyses.dla --checkpoint DIR --out DIR --prompt ... --answer ' Paris'``.
"""

from dataclasses import dataclass

import plotly.graph_objects as go
import torch
from jaxtyping import Float, Int
from torch import Tensor

from . import cli
from .common import prompt_tokens, single_token
from .html import Page, heatmap, to_jsonable


@dataclass
class DLAResult:
    heads: Float[Tensor, "layer head_index"]
    mlps: Float[Tensor, "layer"] | None
    other: dict[str, float]  # embed, pos_embed, attn biases, ln_final bias, remainder
    total: float  # the logit (difference) itself: everything above sums to it


def component_stack(model, cache) -> tuple[Float[Tensor, "component batch pos d_model"], list[str]]:
    """Everything that wrote the final residual stream, labelled; sums to it exactly
    (the last component, "remainder", holds the rounding)."""
    heads, labels = cache.stack_head_results(return_labels=True)
    parts, names = [heads], list(labels)
    L = model.cfg.n_layers
    if not model.cfg.attn_only:
        parts.append(torch.stack([cache["mlp_out", l] for l in range(L)]))
        names += [f"L{l}MLP" for l in range(L)]
    # A rotary model's positions act inside attention: they write nothing here.
    pos_embed = cache["pos_embed"] if "hook_pos_embed" in cache.cache_dict else torch.zeros_like(cache["embed"])
    parts.append(torch.stack([cache["embed"], pos_embed]))
    names += ["embed", "pos_embed"]
    bias = torch.stack([model.blocks[l].attn.b_O.detach() for l in range(L)]).sum(0)
    parts.append(bias.expand_as(cache["embed"])[None])
    names.append("attn_biases")
    stack = torch.cat(parts)
    remainder = cache["resid_post", L - 1] - stack.sum(0)
    return torch.cat([stack, remainder[None]]), names + ["remainder"]


def direct_logit_attribution(
    model, tokens: Int[Tensor, "batch pos"], answer: str | int, wrong: str | int | None = None, pos: int = -1, cache=None,
) -> DLAResult:
    """Each component's direct contribution to ``logit(answer) - logit(wrong)`` at ``pos``,
    averaged over the batch.

    >>> result = direct_logit_attribution(model, model.to_tokens("The capital of France is"), " Paris")
    >>> result.heads.shape  # [n_layers n_heads]
    torch.Size([2, 4])
    """
    tokens = model.check_tokens(tokens)
    answer_id = single_token(model, answer)
    wrong_id = None if wrong is None else single_token(model, wrong)
    if cache is None:
        with torch.no_grad():  # no gradient wanted: no graph kept
            _, cache = model.run_with_cache(tokens)
    stack, labels = component_stack(model, cache)
    direction = (model.W_U[:, answer_id] - (model.W_U[:, wrong_id] if wrong_id is not None else 0)).detach()
    # The final layer norm as a linear map: apply_ln_to_stack centres and divides by the
    # cached scale (at ``pos``); its weight multiplies the direction here (a folded model,
    # with LNPre, has it in W_U already); its bias, and b_U, are constant terms.
    ln = model.ln_final
    weight = ln.w.detach() if hasattr(ln, "w") else 1.0
    scaled = cache.apply_ln_to_stack(stack[:, :, pos], pos_slice=pos)
    attrs = (scaled * (weight * direction).to(scaled.device)).sum(-1).mean(-1).cpu()  # [component]
    b_U = model.b_U.detach()
    constant = b_U[answer_id] - (b_U[wrong_id] if wrong_id is not None else 0)
    ln_bias = float((ln.b.detach() @ direction if hasattr(ln, "b") else 0) + constant)
    L, H = model.cfg.n_layers, model.cfg.n_heads
    by_label = dict(zip(labels, attrs.tolist()))
    mlps = None if model.cfg.attn_only else torch.tensor([by_label[f"L{l}MLP"] for l in range(L)])
    other = {k: by_label[k] for k in ("embed", "pos_embed", "attn_biases", "remainder")} | {"ln_final_bias": ln_bias}
    return DLAResult(attrs[: L * H].reshape(L, H), mlps, other, float(attrs.sum()) + ln_bias)


def add_to_page(page: Page, result: DLAResult, title: str) -> None:
    page.add_heading(title)
    L, H = result.heads.shape
    page.add_plotly(heatmap(result.heads, x=[f"H{h}" for h in range(H)], y=[f"L{l}" for l in range(L)],
                            title=f"Direct contribution of each head (total {result.total:.3f})", xlabel="head",
                            ylabel="layer", text=[[f"{v:+.2f}" for v in row] for row in result.heads.tolist()]))
    names = ([f"L{l} MLP" for l in range(L)] if result.mlps is not None else []) + list(result.other)
    values = (result.mlps.tolist() if result.mlps is not None else []) + list(result.other.values())
    fig = go.Figure(go.Bar(x=names, y=values))
    fig.update_layout(title="MLPs and other components", yaxis_title="direct contribution", height=350)
    page.add_plotly(fig)


def main(argv=None) -> int:
    p = cli.parser("analyses.dla", "Direct logit attribution of every head and MLP to an answer's logit.")
    p.add_argument("--answer", required=True, help="the answer token (a single token, e.g. ' Paris')")
    p.add_argument("--wrong", default=None, help="a competing token: attribute the logit difference instead")
    p.add_argument("--pos", type=int, default=-1, help="the position whose prediction is attributed (default: last)")
    args = p.parse_args(argv)
    model = cli.load_model(args.checkpoint, args.device)
    tokens = prompt_tokens(model, args.prompt)
    if not -tokens.shape[1] <= args.pos < tokens.shape[1]:
        raise ValueError(f"--pos {args.pos} is outside the prompt's {tokens.shape[1]} tokens")
    out = cli.out_dir(args.out)
    result = direct_logit_attribution(model, tokens, args.answer, args.wrong, args.pos)
    page = Page(f"Direct logit attribution: {args.checkpoint}")
    target = f"logit({args.answer!r})" + (f" - logit({args.wrong!r})" if args.wrong else "")
    page.add_text(f"prompt: {args.prompt!r}; attributing {target} at position {args.pos}")
    add_to_page(page, result, "Direct logit attribution")
    return cli.finish(out, page.save, {"args": vars(args), "heads": to_jsonable(result.heads),
                                          "mlps": to_jsonable(result.mlps), "other": result.other, "total": result.total})


if __name__ == "__main__":
    cli.run(main)

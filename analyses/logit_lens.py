"""Logit lens: read each layer's residual stream through ``ln_final`` and the unembedding.

For each layer (the residual stream before it, between attention and MLP, or after it),
the top-k tokens and their probabilities, the probability and rank of the actual next
token, and the next-token loss the model would have if it stopped there. The last layer's
``resid_post`` gives exactly the model's logits.

Command line: ``python -m analyses.logit_lens --checkpoint DIR --out DIR --prompt "..."``
or ``--data DATA_DIR --split val`` for a batch of the data.
"""

from dataclasses import dataclass

import plotly.graph_objects as go
import torch
from jaxtyping import Float, Int
from torch import Tensor

from . import cli
from .common import AnalysisError, check_data_vocab, load_split_batch, prompt_tokens
from .html import Page, heatmap, to_jsonable

SITES = ("pre", "mid", "post", "all")


def residual_stack(model, cache, site: str = "post") -> tuple[Float[Tensor, "layer batch pos d_model"], list[str]]:
    """The residual stream at ``site`` of every layer, and labels such as ``"3_post"``.

    ``pre`` adds the final stream as a last row (``"final"``); ``all`` interleaves pre and
    mid and ends with the final stream."""
    L = model.cfg.n_layers
    if site not in SITES:
        raise AnalysisError(f"unknown residual site {site!r}; choose from {', '.join(SITES)}")
    if site in ("mid", "all") and model.cfg.attn_only:
        raise AnalysisError("an attention-only model has no resid_mid: use --site pre or post")
    if site == "post":
        return torch.stack([cache["resid_post", l] for l in range(L)]), [f"{l}_post" for l in range(L)]
    if site == "mid":
        return torch.stack([cache["resid_mid", l] for l in range(L)]), [f"{l}_mid" for l in range(L)]
    stack, labels = cache.accumulated_resid(incl_mid=site == "all", return_labels=True)
    return stack, ["final" if label == "final_post" else label for label in labels]


def layer_logits(model, resid: Float[Tensor, "... d_model"]) -> Float[Tensor, "... d_vocab"]:
    """``ln_final`` (with this stream's own scale) then the unembedding."""
    with torch.no_grad():
        return model.unembed(model.ln_final(resid))


@dataclass
class LogitLensResult:
    labels: list[str]  # one per layer row
    top_tokens: Int[Tensor, "layer batch pos k"]
    top_probs: Float[Tensor, "layer batch pos k"]
    target_prob: Float[Tensor, "layer batch pos_minus_1"]  # probability of the actual next token
    target_rank: Int[Tensor, "layer batch pos_minus_1"]  # 0 = the top prediction
    loss: Float[Tensor, "layer"]  # mean next-token loss per layer


def logit_lens(model, tokens: Int[Tensor, "batch pos"], site: str = "post", top_k: int = 5, cache=None) -> LogitLensResult:
    """The logit lens at ``site`` ("pre", "mid", "post" or "all") of every layer.

    >>> result = logit_lens(model, model.to_tokens("The cat sat on the"))
    >>> result.loss.shape  # [n_layers]: next-token loss read off each layer
    torch.Size([2])
    """
    tokens = model.check_tokens(tokens)
    if cache is None:
        with torch.no_grad():  # no gradient wanted: no graph kept
            _, cache = model.run_with_cache(tokens, names_filter=lambda n: "hook_resid" in n)
    stack, labels = residual_stack(model, cache, site)
    targets = tokens[:, 1:]
    tops, top_probs, target_prob, target_rank, losses = [], [], [], [], []
    for resid in stack:  # one layer at a time: [batch pos d_vocab] logits are large
        log_probs = layer_logits(model, resid).float().log_softmax(-1)
        top = log_probs.topk(min(top_k, model.cfg.d_vocab), dim=-1)
        tops.append(top.indices)
        top_probs.append(top.values.exp())
        target_logp = log_probs[:, :-1].gather(-1, targets[..., None])[..., 0]
        target_prob.append(target_logp.exp())
        target_rank.append((log_probs[:, :-1] > target_logp[..., None]).sum(-1))
        losses.append(-target_logp.mean() if targets.numel() else torch.tensor(float("nan")))
    return LogitLensResult(labels, torch.stack(tops).cpu(), torch.stack(top_probs).cpu(), torch.stack(target_prob).cpu(),
                           torch.stack(target_rank).cpu(), torch.stack(losses).cpu())


def per_layer_loss(model, tokens: Int[Tensor, "batch pos"], site: str = "post") -> Float[Tensor, "layer"]:
    """Next-token loss read off each layer's residual stream (the last equals the model's loss).

    >>> per_layer_loss(model, tokens).shape
    torch.Size([2])
    """
    return logit_lens(model, tokens, site=site, top_k=1).loss


def add_to_page(page: Page, model, tokens: Tensor, result: LogitLensResult, title: str) -> None:
    page.add_heading(title)
    str_tokens = model.to_str_tokens(tokens[0])
    positions = [f"{i}: {t!r}" for i, t in enumerate(str_tokens)]
    cell_text = [[repr(model.to_string([int(t)]))[1:-1][:8] for t in row] for row in result.top_tokens[:, 0, :, 0]]
    fig = heatmap(result.top_probs[:, 0, :, 0], x=positions, y=result.labels, text=cell_text, diverging=False,
                  title="Top token per layer and position (colour: its probability; first sequence)",
                  xlabel="position (input token)", ylabel="layer")
    fig.update_traces(zmin=0, zmax=1)
    page.add_plotly(fig)
    ranks = result.target_rank[:, 0].float()
    page.add_plotly(heatmap(
        torch.log10(ranks + 1), x=positions[:-1], y=result.labels, text=[[str(int(r)) for r in row] for row in ranks],
        diverging=False, title="Rank of the actual next token (colour: log10(rank + 1); 0 = top prediction)",
        xlabel="position", ylabel="layer",
    ))
    fig = go.Figure(go.Scatter(x=result.labels, y=result.loss.tolist(), mode="lines+markers"))
    fig.update_layout(title="Next-token loss read off each layer", xaxis_title="layer", yaxis_title="loss", height=350)
    page.add_plotly(fig)


def main(argv=None) -> int:
    p = cli.parser("analyses.logit_lens", "Logit lens: each layer's residual stream through ln_final and the unembedding.")
    p.add_argument("--data", default=None, help="data_prep directory of token shards; analyse a batch of it instead of --prompt")
    p.add_argument("--split", default="val", help="which split's shards to read with --data")
    p.add_argument("--batch", type=int, default=8, help="number of sequences drawn with --data")
    p.add_argument("--seq-len", type=int, default=64, help="tokens per sequence drawn with --data")
    p.add_argument("--seed", type=int, default=0, help="seed for the windows drawn with --data")
    p.add_argument("--site", choices=SITES, default="post", help="which residual stream of each layer to read")
    p.add_argument("--top-k", type=int, default=5, help="number of top tokens to keep per cell")
    args = p.parse_args(argv)
    model = cli.load_model(args.checkpoint, args.device)
    if args.data is not None:
        if args.seq_len > model.cfg.n_ctx:
            raise AnalysisError(f"--seq-len {args.seq_len} exceeds the model's context of {model.cfg.n_ctx}")
        check_data_vocab(model, args.data)
        tokens = load_split_batch(args.data, args.split, args.batch, args.seq_len, args.seed).to(model.W_E.device)
    else:
        tokens = prompt_tokens(model, args.prompt)
    out = cli.out_dir(args.out)
    result = logit_lens(model, tokens, args.site, args.top_k)
    page = Page(f"Logit lens: {args.checkpoint}")
    source = f"{args.batch} windows of {args.data} ({args.split})" if args.data else repr(args.prompt)
    page.add_text(f"input: {source}; residual stream: {args.site}")
    add_to_page(page, model, tokens, result, "Logit lens")
    return cli.finish(out, page.save, {
        "args": vars(args), "labels": result.labels, "loss": to_jsonable(result.loss),
        "top_tokens": to_jsonable(result.top_tokens), "top_probs": to_jsonable(result.top_probs),
        "target_prob": to_jsonable(result.target_prob), "target_rank": to_jsonable(result.target_rank),
    })


if __name__ == "__main__":
    cli.run(main)

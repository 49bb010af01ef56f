"""One page for one checkpoint: logit lens, attention, head detectors, ablation, direct
logit attribution and (with --clean/--corrupted) activation patching.

Command line: ``python -m analyses.report --checkpoint DIR [--out DIR] [--prompt ...]``.
"""

from pathlib import Path

import torch

from . import ablation, attention, cli, dla, heads, logit_lens, patching
from .common import logit_diff, parse_layers, prompt_tokens, single_token
from .html import Page, to_jsonable


def main(argv=None) -> int:
    p = cli.parser("analyses.report", "A one-page report of every analysis for one checkpoint.")
    p.set_defaults(out=None)
    for action in p._actions:
        if action.dest == "out":
            action.required = False
            action.help = "directory for report.html and results.json (default: CHECKPOINT/analysis)"
    p.add_argument("--layers", default="all", help="layers whose attention patterns are shown, or 'all'")
    p.add_argument("--clean", default=None, help="clean prompt for activation patching (needs --corrupted and --answer)")
    p.add_argument("--corrupted", default=None, help="corrupted prompt for activation patching (same token length)")
    p.add_argument("--answer", default=None, help="answer token for patching and direct logit attribution (default for DLA: the model's top prediction)")
    p.add_argument("--wrong", default=None, help="competing answer token for the logit difference")
    p.add_argument("--seed", type=int, default=0, help="seed for random tokens (head detectors, ablation references)")
    args = p.parse_args(argv)
    model = cli.load_model(args.checkpoint, args.device)
    tokens = prompt_tokens(model, args.prompt)
    layers = parse_layers(model, args.layers)
    patch_args = (args.clean, args.corrupted)
    if any(patch_args) and not (all(patch_args) and args.answer):
        raise ValueError("patching needs --clean, --corrupted and --answer together")
    out = cli.out_dir(args.out or Path(args.checkpoint) / "analysis")
    with torch.no_grad():  # no gradient wanted: no graph kept
        _, cache = model.run_with_cache(tokens)
    str_tokens = model.to_str_tokens(tokens[0])
    page = Page(f"Analysis of {args.checkpoint}")
    page.add_text(f"prompt: {args.prompt!r}")
    results = {"args": vars(args)}

    lens = logit_lens.logit_lens(model, tokens, cache=cache)
    logit_lens.add_to_page(page, model, tokens, lens, "Logit lens")
    results["logit_lens_loss"] = to_jsonable(lens.loss)

    attention.add_to_page(page, str_tokens, attention.attention_patterns(model, tokens, layers, cache=cache))

    scores = heads.head_scores(model, seed=args.seed, seq_len=min(20, (model.cfg.n_ctx - 1) // 2))
    heads.add_to_page(page, scores, "Head detectors (repeated random tokens)")
    results["head_scores"] = to_jsonable(scores)

    reference = ablation.reference_batch(model, tokens.shape[1], 8, args.seed)
    ablations = {m: ablation.head_ablation(model, tokens, m, reference_tokens=reference, seed=args.seed)
                 for m in ablation.METHODS}
    ablation.add_to_page(page, ablations, "Ablation (change in loss on the prompt)")
    results["ablation"] = {m: to_jsonable(r.heads) for m, r in ablations.items()}

    answer = args.answer if args.answer is not None else _top_token(model, tokens)
    result = dla.direct_logit_attribution(model, tokens, answer, args.wrong, cache=cache)
    dla.add_to_page(page, result, f"Direct logit attribution of {model.to_string([single_token(model, answer)])!r} at the last position")
    results["dla"] = {"heads": to_jsonable(result.heads), "mlps": to_jsonable(result.mlps), "total": result.total}

    if args.clean:
        clean, corrupted = prompt_tokens(model, args.clean), prompt_tokens(model, args.corrupted)
        metric = logit_diff(single_token(model, args.answer), None if args.wrong is None else single_token(model, args.wrong))
        real = patching.activation_patching(model, clean, corrupted, metric)
        patching.add_to_page(page, real, model.to_str_tokens(clean[0]), "Activation patching")
        results["patching"] = to_jsonable(real)
    else:
        page.add_heading("Activation patching")
        page.add_text("not run: give --clean, --corrupted and --answer (python -m analyses.patching has defaults)", note=True)

    return cli.finish(out, page.save, results)


def _top_token(model, tokens) -> int:
    with torch.no_grad():
        return int(model(tokens)[0, -1].argmax())


if __name__ == "__main__":
    cli.run(main)

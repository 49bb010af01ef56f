"""Activation-patching sweeps against TransformerLens's ``patching`` module and against
the limit, on the same weights, in alternating rounds.

Two sweeps, as a notebook makes them: every layer x position of the residual stream
(``resid_pre``) and every head's output (``head_out``). Each round times, one after the
other:

- ours: ``analyses.patching.run_patched`` (batched; each patched run starts at its
  patched block from the corrupted run's cached stream, unembedding only the metric's
  position);
- ours recomputing every patched run from the tokens (``reuse=False``, still batched);
- TransformerLens 3.x's ``transformer_lens.patching`` on a HookedTransformer with the
  same weights (one forward pass per patch, from the tokens);
- the limit: the same batched forwards from each patched block with no hooks and no
  metric, i.e. the summed cost of the layers at and above each patch.

It prints, per sweep, the median over rounds of TransformerLens's time over ours (target
>= 20x) and of ours over the limit (target <= 1.3x), each with its range and the number
of rounds, and checks that both sweeps give the same numbers.

    python benchmarks/bench_patching.py [--rounds 3] [--threads 1] [--n-layers 4 --d-model 256 --n-pos 20]

About 10 s per round on one thread here (TransformerLens's 112 forward passes are most of it).
"""

import argparse
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from analyses.common import logit_diff  # noqa: E402
from analyses.patching import (  # noqa: E402
    baseline, chunk_reads_last, forward_from, patches_for, residual_names, run_patched, run_plan,
)
from benchmarks.common import machine_load, rounds_ratio  # noqa: E402
from benchmarks.reference_model import transformer_lens_copy  # noqa: E402
from hooked_gpt2 import GPT2Config, HookedGPT2, keep_freed_memory  # noqa: E402

TL_SWEEPS = {"resid_pre": "get_act_patch_resid_pre", "head_out": "get_act_patch_attn_head_out_all_pos"}


def timed(fn) -> tuple[float, object]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n-layers", type=int, default=4, help="layers of the random model")
    p.add_argument("--d-model", type=int, default=256, help="residual width of the random model")
    p.add_argument("--n-heads", type=int, default=8, help="attention heads per layer")
    p.add_argument("--d-vocab", type=int, default=50257, help="vocabulary size of the model")
    p.add_argument("--n-pos", type=int, default=20, help="prompt length in tokens")
    p.add_argument("--max-copies", type=int, default=32, help="patched runs batched into one forward pass")
    p.add_argument("--rounds", type=int, default=3, help="timed rounds (each times every contender once)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (default 1: on a shared machine more threads time the scheduler)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    keep_freed_memory()  # as the analysis scripts do: reuse the batched logits' memory
    from transformer_lens import patching as tl_patching

    torch.manual_seed(0)
    cfg = GPT2Config(n_layers=args.n_layers, d_model=args.d_model, n_heads=args.n_heads, n_ctx=max(64, args.n_pos),
                     d_vocab=args.d_vocab)
    model = HookedGPT2(cfg).eval()
    theirs = transformer_lens_copy(model)
    clean = torch.randint(args.d_vocab, (1, args.n_pos))
    corrupted = clean.clone()
    corrupted[0, 1] = (clean[0, 1] + 1) % args.d_vocab
    metric = logit_diff(int(clean[0, -1]), (int(clean[0, -1]) + 1) % args.d_vocab)
    base = baseline(model, clean, corrupted, metric)
    with torch.no_grad():
        _, their_cache = theirs.run_with_cache(clean)
    print(f"model: {args.n_layers} layers, d_model {args.d_model}, {args.n_heads} heads, d_vocab {args.d_vocab}; "
          f"prompt {args.n_pos} tokens; {torch.get_num_threads()} CPU threads; torch {torch.__version__}; "
          f"{machine_load()}")

    for kind, tl_function in TL_SWEEPS.items():
        patches, shape = patches_for(model, kind, args.n_pos)
        groups = [[patch] for patch in patches]
        plan = run_plan(model, groups, args.max_copies)
        resid = [base.corrupted_cache[name] for name in residual_names(model)]
        last = chunk_reads_last(model, metric, groups)

        def limit():
            with torch.no_grad():
                for start, chunk in plan:
                    forward_from(model, resid[start].repeat(len(chunk), 1, 1), start, last)

        contenders = {
            "ours": lambda: run_patched(model, corrupted, base.clean_cache, metric, groups, args.max_copies,
                                        base.corrupted_cache),
            "recompute": lambda: run_patched(model, corrupted, base.clean_cache, metric, groups, args.max_copies,
                                             reuse=False),
            "transformer_lens": lambda: getattr(tl_patching, tl_function)(theirs, corrupted, their_cache, metric),
            "limit": limit,
        }
        times: dict[str, list[float]] = {name: [] for name in contenders}
        outputs = {}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # TransformerLens's progress bars and deprecations
            for name, fn in contenders.items():  # warm-up (TransformerLens's sweep warms itself: one forward)
                fn() if name != "transformer_lens" else theirs(corrupted)
            for _ in range(args.rounds):
                for name, fn in contenders.items():
                    seconds, outputs[name] = timed(fn)
                    times[name].append(seconds)
        differs = (outputs["ours"].reshape(shape) - outputs["transformer_lens"].double()).abs().max()
        assert differs < 1e-3, f"{kind}: ours and TransformerLens's sweeps differ by {differs:.3g}"
        ms = {name: sorted(ts)[len(ts) // 2] * 1e3 for name, ts in times.items()}
        print(f"\n{kind} sweep {tuple(shape)}: {len(patches)} patched runs in {len(plan)} batched forwards; "
              f"largest difference from TransformerLens {differs:.2g}")
        print(f"  median ms: ours {ms['ours']:.1f}, ours recomputing from the tokens {ms['recompute']:.1f}, "
              f"TransformerLens {ms['transformer_lens']:.1f}, limit {ms['limit']:.1f}")
        print(f"  TransformerLens / ours:        {rounds_ratio(times['transformer_lens'], times['ours'])}  (target >= 20x)")
        print(f"  ours / limit:                  {rounds_ratio(times['ours'], times['limit'])}  (target <= 1.3x)")
        print(f"  recomputing / reusing (ours):  {rounds_ratio(times['recompute'], times['ours'])}")


if __name__ == "__main__":
    main()

"""Residual-stream patching sweep (every layer x position) against one forward pass.

The sweep batches its patched runs (``max_copies`` copies of the corrupted prompt per
forward pass, each with its own patch) and reuses one cached clean run. This prints its
time as a multiple of one forward pass on the prompt, beside the number of patched runs
it stands for, and the same for an unbatched loop (one forward pass per patch).

    python benchmarks/bench_patching.py [--preset tiny] [--n-pos 32]
"""

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from analyses.common import logit_diff  # noqa: E402
from analyses.patching import baseline, patches_for, run_patched  # noqa: E402
from hooked_gpt2 import GPT2Config, HookedGPT2, keep_freed_memory  # noqa: E402


def best_of(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="tiny", help="GPT2Config preset of the (random) model")
    p.add_argument("--d-vocab", type=int, default=50257, help="vocabulary size of the model")
    p.add_argument("--n-pos", type=int, default=32, help="prompt length in tokens")
    p.add_argument("--max-copies", type=int, default=32, help="patched runs batched into one forward pass")
    p.add_argument("--repeats", type=int, default=3, help="timing repeats (the best is kept)")
    args = p.parse_args()
    keep_freed_memory()  # as the analysis scripts do: reuse the batched logits' memory
    torch.manual_seed(0)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    model = HookedGPT2(GPT2Config.preset(args.preset, d_vocab=args.d_vocab)).eval()
    clean = torch.randint(args.d_vocab, (1, args.n_pos))
    corrupted = clean.clone()
    corrupted[0, 1] = (clean[0, 1] + 1) % args.d_vocab
    metric = logit_diff(int(clean[0, -1]), (int(clean[0, -1]) + 1) % args.d_vocab)
    base = baseline(model, clean, corrupted, metric)
    patches, shape = patches_for(model, "resid_pre", args.n_pos)
    groups = [[patch] for patch in patches]

    with torch.no_grad():
        forward = best_of(lambda: model(corrupted), args.repeats * 3)
    batched = best_of(lambda: run_patched(model, corrupted, base.clean_cache, metric, groups, args.max_copies), args.repeats)
    unbatched = best_of(lambda: run_patched(model, corrupted, base.clean_cache, metric, groups, 1), 1)
    n = len(patches)
    print(f"model: {args.preset} ({model.cfg.n_layers} layers, d_model {model.cfg.d_model}, d_vocab {args.d_vocab}), "
          f"prompt {args.n_pos} tokens, {torch.get_num_threads()} CPU threads")
    print(f"resid_pre sweep {tuple(shape)}: {n} patched runs")
    print(f"one forward pass:                  {forward * 1e3:8.2f} ms  (1.0x)")
    print(f"sweep, batched {args.max_copies:3d} copies/pass:  {batched * 1e3:8.2f} ms  ({batched / forward:6.1f}x a forward pass, for {n} runs)")
    print(f"sweep, one pass per patch:        {unbatched * 1e3:8.2f} ms  ({unbatched / forward:6.1f}x a forward pass, for {n} runs)")
    print(f"batching speed-up: {unbatched / batched:.2f}x")


if __name__ == "__main__":
    main()

"""HookedGPT2's costs against references measured in the same run.

1. Idle hooks: forward+backward of HookedGPT2 with no hooks attached against a hook-free
   reference written here (same maths, SDPA attention). Target: ratio <= 1.03.
2. Inference without hooks against transformers' GPT2LMHeadModel on the same weights
   (8 layers, d_model 512, 4 x 256 tokens, fp32). Target: ours at least as fast.
3. run_with_cache with no filter against our own plain forward. Target: <= 1.15x (as in
   TransformerLens, per-head hook_result is cached only after set_use_attn_result(True);
   that costlier cache is reported beside it); peak memory reported against the bytes
   actually cached.
4. Greedy generation of 256 tokens with the KV cache against transformers' generate
   (target >= 1.5x tokens/s) and against recomputing the whole prefix (target >= 5x);
   on this model at batch 1 and 4, and on the mini preset's shape. mini's 2-layer
   d_model 128 model over at most 256 positions costs little more to recompute than its
   50257-row unembedding, which both ways pay once per token: no cache can be 5x there.
5. Architecture variants: inference forward of each (rotary, RMSNorm, SwiGLU at about
   the same parameters, QK-norm, no biases, and the llama-style combination) beside
   GPT-2's, on the shape of 1-3. GPT-2's own speed is what 1 and 2 pin.

Run: python benchmarks/bench_model.py [--repeats N] [--threads N] [--only 1 2 3 4 5]
"""

import argparse
import dataclasses
import math
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import (  # noqa: E402
    interleaved_medians, interleaved_times, machine_load, medians, reset_peak_rss, rounds_ratio, rss_kib,
)
from benchmarks.reference_model import RefGPT2  # noqa: E402
from hooked_gpt2 import GPT2Config, HookedGPT2, keep_freed_memory  # noqa: E402


def fwd_bwd(model, tokens):
    def step():
        model.zero_grad(set_to_none=True)
        logits = model(tokens[:, :-1])
        F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten()).backward()

    return step


def measure_cache_memory(cfg: GPT2Config, model: HookedGPT2, tokens: torch.Tensor) -> tuple[int, int]:
    """Peak resident-memory growth of one run_with_cache in a fresh process, and the bytes
    it keeps (activations and logits). A fresh process, because a warm allocator reuses
    freed pages and would hide the growth."""
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        torch.save(tokens, f"{tmp}/tokens.pt")
        out = subprocess.run(
            [sys.executable, __file__, "--memory-probe", tmp], capture_output=True, text=True, check=True
        ).stdout.split()
    return int(out[-2]), int(out[-1])


def memory_probe(checkpoint: str) -> None:
    torch.set_num_threads(1)
    keep_freed_memory()
    model = HookedGPT2.from_pretrained(checkpoint)
    tokens = torch.load(f"{checkpoint}/tokens.pt", weights_only=True)
    with torch.inference_mode():
        model(tokens[:, :8])  # warm up kernels and the allocator's first pages
    reset_peak_rss()
    base = rss_kib()
    with torch.no_grad():  # what is cached, not an autograd graph (run_with_cache keeps torch's grad mode)
        logits, cache = model.run_with_cache(tokens)
    peak = (rss_kib("VmHWM") - base) * 1024
    storages = {v.untyped_storage().data_ptr(): v.untyped_storage().nbytes() for v in cache.values()}
    print(peak, sum(storages.values()) + logits.numel() * logits.element_size())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=7, help="timed repeats per measurement (median taken)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--only", type=int, nargs="+", choices=[1, 2, 3, 4, 5], help="run only these measurements")
    parser.add_argument("--memory-probe", metavar="DIR", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_probe:
        return memory_probe(args.memory_probe)
    if args.threads:
        torch.set_num_threads(args.threads)
    keep_freed_memory()  # for every model measured here alike, as training and the analyses do
    import transformers

    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    cfg = GPT2Config(n_layers=8, d_model=512, n_heads=8, n_ctx=512)
    model = HookedGPT2(cfg)
    tokens = torch.randint(0, cfg.d_vocab, (4, 257))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {machine_load()}; model {cfg.n_layers} layers, "
          f"d_model {cfg.d_model}, {model.n_params() / 1e6:.1f}M params; batch 4 x 256 tokens, fp32 CPU\n")

    only = set(args.only or [1, 2, 3, 4, 5])
    # 1. Idle hooks, training step.
    ref = RefGPT2(cfg)
    ref.load_state_dict(model.state_dict())
    model.train(), ref.train()
    if 1 in only:
        times = interleaved_times(
            {"ours": fwd_bwd(model, tokens), "ref": fwd_bwd(ref, tokens)}, args.repeats, until_steady=10
        )
        t = medians(times)
        print(f"1. forward+backward, no hooks: HookedGPT2 {t['ours'] * 1e3:.0f} ms, hook-free reference "
              f"{t['ref'] * 1e3:.0f} ms (medians); our time / the reference's per round "
              f"{rounds_ratio(times['ours'], times['ref'])} (target <= 1.03)")

    # 2. Inference against transformers.
    model.eval()
    save_dir = Path(__import__("tempfile").mkdtemp())
    model.save_hf(save_dir)
    hf = transformers.GPT2LMHeadModel.from_pretrained(save_dir).eval()
    x = tokens[:, :256]
    with torch.inference_mode():
        assert (hf(x).logits - model(x)).abs().max() < 1e-4
        if 2 in only:
            times = interleaved_times({"ours": lambda: model(x), "hf": lambda: hf(x).logits}, args.repeats)
            t = medians(times)
            print(f"2. inference, no hooks: HookedGPT2 {t['ours'] * 1e3:.0f} ms, transformers {t['hf'] * 1e3:.0f} "
                  f"ms (medians); speed ratio per round {rounds_ratio(times['hf'], times['ours'])} (target >= 1.0)")

    # 3. run_with_cache of every hook against the plain forward.
    if 3 in only:
        def cache_with_results():
            model.set_use_attn_result(True)
            try:
                return model.run_with_cache(x)
            finally:
                model.set_use_attn_result(False)

        with torch.inference_mode():
            n_cached = len(model.run_with_cache(x)[1])
            times = interleaved_times(
                {"plain": lambda: model(x), "cache": lambda: model.run_with_cache(x), "results": cache_with_results},
                args.repeats,
            )
            t = medians(times)
        peak, cached = measure_cache_memory(cfg, model, x)
        print(f"3. run_with_cache (no filter: {n_cached} hooks): {t['cache'] * 1e3:.0f} ms against plain "
              f"forward {t['plain'] * 1e3:.0f} ms, ratio per round {rounds_ratio(times['cache'], times['plain'])} "
              f"(target <= 1.15);\n   with set_use_attn_result(True) {rounds_ratio(times['results'], times['plain'])}\n"
              f"   memory (fresh process): peak RSS growth {peak / 2**20:.0f} MiB for {cached / 2**20:.0f} MiB "
              f"of cached activations and logits ({peak / cached:.2f}x)")

    if 5 in only:
        measure_variants(cfg, x, args.repeats)

    # 4. Greedy generation, on this model (batch 1 and 4) and on the mini preset's shape, where
    # the per-step overhead around the matrix products matters more.
    if 4 not in only:
        return
    print("4. greedy generation of 256 new tokens (240 for mini's 256-position context) after 16:")
    measure_generation("8 layers, d_model 512, batch 1", model, hf, tokens[:1, :16], args.repeats)
    measure_generation("8 layers, d_model 512, batch 4", model, hf, tokens[:, :16], args.repeats)
    torch.manual_seed(0)
    demo = HookedGPT2(GPT2Config.preset("mini")).eval()
    demo_dir = Path(tempfile.mkdtemp())
    demo.save_hf(demo_dir)
    demo_hf = transformers.GPT2LMHeadModel.from_pretrained(demo_dir).eval()
    measure_generation("mini preset (2 layers, d_model 128), batch 1", demo, demo_hf, tokens[:1, :16], args.repeats)


VARIANTS = {
    "rotary": dict(positional="rotary"),
    "rmsnorm": dict(norm="rmsnorm"),
    "swiglu": dict(mlp="swiglu", d_mlp=1368),  # about 8/3 d_model: GPT-2's MLP parameters
    "qk_norm": dict(qk_norm=True),
    "no_biases": dict(qkv_bias=False, attn_bias=False, mlp_bias=False),
    "llama-style": dict(positional="rotary", norm="rmsnorm", mlp="swiglu", d_mlp=1368, qkv_bias=False,
                        attn_bias=False, mlp_bias=False, tie_embeddings=False),
}


def measure_variants(cfg: GPT2Config, x: torch.Tensor, repeats: int) -> None:
    models = {"gpt2": HookedGPT2(cfg).eval()}
    models |= {name: HookedGPT2(dataclasses.replace(cfg, **kw)).eval() for name, kw in VARIANTS.items()}
    with torch.inference_mode():
        times = interleaved_times({name: (lambda m=m: m(x)) for name, m in models.items()}, repeats)
    t = medians(times)
    print("5. inference forward of each architecture variant, no hooks (median ratio to GPT-2 within a round):")
    for name in models:
        print(f"   {name:>12}: {t[name] * 1e3:.0f} ms, GPT-2's time x {rounds_ratio(times[name], times['gpt2'])}")


def measure_generation(label: str, model: HookedGPT2, hf, prompt: torch.Tensor, repeats: int) -> None:
    new = min(256, model.cfg.n_ctx - prompt.shape[1])

    def hf_generate():
        return hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new, do_sample=False,
                           eos_token_id=None, pad_token_id=0)

    with torch.inference_mode():
        assert torch.equal(model.generate(prompt, new, temperature=0), hf_generate()), "greedy generations differ"
        times = interleaved_times(
            {"kv": lambda: model.generate(prompt, new, temperature=0), "hf": hf_generate}, max(3, math.ceil(repeats / 2))
        )
        t = medians(times)
        # Recomputing is quadratic in length: one run is enough to see the gap.
        t |= interleaved_medians(
            {"recompute": lambda: model.generate(prompt, new, temperature=0, use_kv_cache=False)}, 1, warmup=0
        )
    rate = {k: new * prompt.shape[0] / v for k, v in t.items()}
    print(f"   {label}: KV cache {rate['kv']:.0f} tok/s, transformers generate {rate['hf']:.0f} tok/s "
          f"(per round {rounds_ratio(times['hf'], times['kv'])}, target >= 1.5x),\n     recomputing the prefix {rate['recompute']:.0f} tok/s "
          f"({rate['kv'] / rate['recompute']:.1f}x from one run: recomputing is slow enough to settle it, target >= 5x)")


if __name__ == "__main__":
    main()

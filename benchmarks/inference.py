"""Which inference optimisations matter: a study for a model you name.

For each setting (one optimisation alone, and a few stacked) greedy generation is timed in
rounds, every setting once per round, so load from elsewhere falls on all of them alike:
prefill latency (the prompt's forward pass), decode latency per step and decode tokens/s,
the decode speed per round as a multiple of the plain KV-cache row's (median, range,
rounds), peak resident-memory growth, and what the setting costs in exactness: the share
of greedy tokens identical to the fp32 KV-cache generation of the same prompts, and the
change in next-token loss on evaluation tokens. Decode reads every weight once per step,
so beside each decode row stands its limit: the bytes of the weights it reads divided by
the memory bandwidth measured in this run.

    python benchmarks/inference.py --rounds 3 --out docs/inference   # GPT-2 small's shape, random weights
    python benchmarks/inference.py --model runs/demo/checkpoint --draft mini   # a checkpoint
    python benchmarks/inference.py --model path/to/hf-gpt2 --only kv_cache int8_weights
    python benchmarks/inference.py --quick                                     # seconds: the test's mode

``--model`` and ``--draft`` take a preset name (random weights), a hooked-gpt2
checkpoint directory or a Hugging Face GPT-2 directory.
"""

import argparse
import copy
import contextlib
import io
import json
import math
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import machine_load, reset_peak_rss, rounds_ratio, rss_kib  # noqa: E402
from hooked_gpt2 import GPT2Config, HookedGPT2, keep_freed_memory  # noqa: E402
from hooked_gpt2.config import PRESETS  # noqa: E402
from hooked_gpt2.generation import speculative_greedy  # noqa: E402


@dataclass(frozen=True)
class Setting:
    """One way of generating: the optimisations it stacks."""

    name: str
    what: str
    batch: int = 1
    kv_cache: bool = True
    weights: str = "fp32"  # fp32, bf16, fp16 (half weights) or int8 (weight-only, torchao)
    autocast: bool = False  # bf16 autocast over fp32 weights
    attention: str = "sdpa"  # or "explicit": scores and softmax written out, as hooks see them
    compile: bool = False
    speculative: int = 0  # tokens drafted per step by the draft model (0: none)


REFERENCE = "kv_cache"
SETTINGS = [
    Setting("no_cache", "recompute the whole prefix every step", kv_cache=False),
    Setting(REFERENCE, "KV cache, batch 1, fp32, SDPA (the reference row)"),
    Setting("batch_8", "KV cache, 8 sequences at once", batch=8),
    Setting("batch_32", "KV cache, 32 sequences at once", batch=32),
    Setting("bf16_autocast", "bf16 autocast over fp32 weights", autocast=True),
    Setting("bf16_weights", "weights cast to bf16", weights="bf16"),
    Setting("fp16_weights", "weights cast to fp16", weights="fp16"),
    Setting("explicit_attention", "attention scores and softmax written out instead of SDPA", attention="explicit"),
    Setting("int8_weights", "int8 weight-only quantisation (torchao Int8WeightOnlyConfig)", weights="int8"),
    Setting("compiled", "torch.compile of the forward pass (dynamic shapes)", compile=True),
    Setting("speculative", "speculative decoding, 4 tokens drafted per step by the draft model", speculative=4),
    Setting("batch_32_bf16", "stacked: batch 32 + bf16 weights", batch=32, weights="bf16"),
    Setting("batch_32_int8", "stacked: batch 32 + int8 weights", batch=32, weights="int8"),
    Setting("speculative_int8", "stacked: speculative decoding + int8 weights (both models)", weights="int8",
            speculative=4),
]


@dataclass
class Row:
    setting: Setting
    status: str = "ok"  # or why it could not run
    prefill_ms: float = math.nan
    decode_ms_per_step: float = math.nan
    decode_tok_s: float = math.nan
    speed_vs_reference: str = ""
    limit_ms_per_step: float = math.nan
    weight_mib: float = math.nan
    peak_mib: float = math.nan
    first_run_s: float = math.nan  # the untimed warm-up generations, compilation included
    tokens_identical: float = math.nan
    loss_change: float = math.nan
    acceptance: float = math.nan
    times: dict = field(default_factory=lambda: {"prefill": [], "total": []})


def load(spec: str, what: str) -> HookedGPT2:
    """A preset name, a hooked-gpt2 checkpoint directory or a Hugging Face GPT-2 directory."""
    if spec in PRESETS:
        return HookedGPT2(GPT2Config.preset(spec)).eval()
    if not Path(spec).is_dir():
        raise SystemExit(f"--{what} {spec!r} is neither a directory nor a preset; give a checkpoint directory, "
                         f"a Hugging Face GPT-2 directory or one of the presets {', '.join(PRESETS)}")
    from analyses.cli import load_model

    return load_model(spec, "cpu")


def prepared(model: HookedGPT2, setting: Setting) -> HookedGPT2:
    """A copy of ``model`` with the setting's weights and compilation (the original is the reference)."""
    model = copy.deepcopy(model)
    if setting.weights in ("bf16", "fp16"):
        model = model.to({"bf16": torch.bfloat16, "fp16": torch.float16}[setting.weights])
    elif setting.weights == "int8":
        from torchao.quantization import Int8WeightOnlyConfig, quantize_

        quantize_(model, Int8WeightOnlyConfig())  # every nn.Linear, the unembedding included
    if setting.compile:
        model.final_residual = torch.compile(model.final_residual, dynamic=True)
    return model


def decode_weight_bytes(model: HookedGPT2) -> int:
    """The bytes one decode step reads: every linear layer's weights (the unembedding among
    them) and the layer norms; the embeddings give one row per token."""
    seen, total = set(), 0
    for module in model.modules():
        if isinstance(module, torch.nn.Embedding):
            continue
        for p in module.parameters(recurse=False):
            if id(p) in seen:
                continue
            seen.add(id(p))
            buffer = io.BytesIO()
            torch.save(p.detach(), buffer)  # counts a quantised tensor's packed data and scales
            total += buffer.getbuffer().nbytes
    return total


def memory_bandwidth(mib: int = 256, repeats: int = 5) -> float:
    """Bytes per second of a large copy (read + write), best of ``repeats``: what decode can stream."""
    src = torch.ones(mib * 2**20 // 4)
    dst = torch.empty_like(src)
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - start)
    return 2 * src.numel() * 4 / best


def generator_for(setting: Setting, model: HookedGPT2, draft: HookedGPT2 | None) -> Callable:
    """``generate(prompts, new) -> (tokens, acceptance)`` under the setting."""
    def contexts():
        stack = contextlib.ExitStack()
        if setting.autocast:
            stack.enter_context(torch.autocast("cpu", dtype=torch.bfloat16))
        if setting.attention == "explicit":  # a hook on the pattern switches attention to the written-out path
            stack.enter_context(model.hooks(fwd_hooks=[(lambda n: n.endswith("hook_pattern"), lambda a, hook: None)]))
        return stack

    def generate(prompts, new):
        with contexts():
            if setting.speculative:
                outs = [speculative_greedy(model, draft, row[None], new, setting.speculative) for row in prompts]
                return torch.cat([o for o, _ in outs]), statistics.mean(a for _, a in outs)
            return model.generate(prompts, new, temperature=0, use_kv_cache=setting.kv_cache), math.nan

    return generate


def heldout_loss(model: HookedGPT2, tokens: torch.Tensor, setting: Setting) -> float:
    with torch.inference_mode(), (torch.autocast("cpu", dtype=torch.bfloat16) if setting.autocast
                                  else contextlib.nullcontext()):
        return float(model(tokens, return_type="loss"))


def run_study(args) -> tuple[list[Row], dict]:
    torch.manual_seed(0)
    base = load(args.model, "model")
    draft = load(args.draft, "draft")
    if draft.cfg.d_vocab != base.cfg.d_vocab:
        raise SystemExit(f"--draft reads {draft.cfg.d_vocab} token ids and --model {base.cfg.d_vocab}: "
                         "draft with a model of the same vocabulary")
    settings = [s for s in SETTINGS if not args.only or s.name in args.only or s.name == REFERENCE]
    unknown = set(args.only or ()) - {s.name for s in SETTINGS}
    if unknown:
        raise SystemExit(f"unknown --only {sorted(unknown)}; choose from {[s.name for s in SETTINGS]}")
    if args.skip:
        settings = [s for s in settings if s.name not in args.skip or s.name == REFERENCE]
    gen = torch.Generator().manual_seed(1)
    max_batch = max(s.batch for s in settings)
    prompts = torch.randint(0, base.cfg.d_vocab, (max_batch, args.prompt_len), generator=gen)
    eval_tokens = torch.randint(0, base.cfg.d_vocab, (4, min(base.cfg.n_ctx, 128)), generator=gen)
    if args.eval_tokens:
        eval_tokens = torch.load(args.eval_tokens, weights_only=True)[:, : base.cfg.n_ctx]
    n_check = min(4, max_batch)  # rows whose greedy tokens are checked against the reference
    reference_tokens = base.generate(prompts[:n_check], args.new_tokens, temperature=0)
    reference_loss = heldout_loss(base, eval_tokens, SETTINGS[1])
    bandwidth = memory_bandwidth()

    rows, runs = [], {}
    for s in settings:
        row = Row(s)
        rows.append(row)
        try:
            model = prepared(base, s)
            small = prepared(draft, s) if s.speculative else None
            generate = generator_for(s, model, small)
            batch_prompts = prompts[: s.batch]
            checked = min(s.batch, n_check)
            reset_peak_rss()
            before = rss_kib()
            start = time.perf_counter()
            generate(batch_prompts, 1)  # warm-up of the timed shapes (compiles, where compiled)
            out, acceptance = generate(batch_prompts, args.new_tokens)
            row.first_run_s = time.perf_counter() - start
            row.peak_mib = (rss_kib("VmHWM") - before) / 1024
            row.tokens_identical = float((out[:checked, args.prompt_len :]
                                          == reference_tokens[:checked, args.prompt_len :]).float().mean())
            row.acceptance = acceptance
            row.loss_change = heldout_loss(model, eval_tokens, s) - reference_loss
            row.weight_mib = decode_weight_bytes(model) / 2**20
            row.limit_ms_per_step = decode_weight_bytes(model) / bandwidth * 1e3
            runs[s.name] = (generate, batch_prompts)
        except Exception as e:  # noqa: BLE001 - an optimisation that fails here is a result to report
            row.status = f"failed: {type(e).__name__}: {str(e).splitlines()[0][:160]}"
    by_name = {row.setting.name: row for row in rows}
    for _ in range(args.rounds):
        for name, (generate, batch_prompts) in runs.items():
            for key, new in (("prefill", 1), ("total", args.new_tokens)):
                start = time.perf_counter()
                generate(batch_prompts, new)
                by_name[name].times[key].append(time.perf_counter() - start)
    steps = args.new_tokens - 1
    per_token = {}  # seconds per generated token of one sequence, per round
    for name in runs:
        row = by_name[name]
        decode = [t - p for t, p in zip(row.times["total"], row.times["prefill"])]
        per_token[name] = [d / (steps * row.setting.batch) for d in decode]
        row.prefill_ms = statistics.median(row.times["prefill"]) * 1e3
        row.decode_ms_per_step = statistics.median(decode) / steps * 1e3
        row.decode_tok_s = row.setting.batch / (row.decode_ms_per_step / 1e3)
    for name in runs:
        if REFERENCE in runs:
            by_name[name].speed_vs_reference = rounds_ratio(per_token[REFERENCE], per_token[name]).short()
    meta = {
        "model": args.model, "draft": args.draft, "n_layers": base.cfg.n_layers, "d_model": base.cfg.d_model,
        "d_vocab": base.cfg.d_vocab, "params_M": base.n_params() / 1e6, "draft_params_M": draft.n_params() / 1e6,
        "prompt_len": args.prompt_len, "new_tokens": args.new_tokens, "rounds": args.rounds,
        "threads": torch.get_num_threads(), "torch": torch.__version__, "bandwidth_GB_s": bandwidth / 1e9,
        "load": machine_load(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "reference_loss": reference_loss,
    }
    return rows, meta


def table(rows: list[Row], meta: dict) -> str:
    head = ("| setting | prefill ms | decode ms/step | decode tok/s | limit ms/step | decode speed vs kv_cache "
            "(median [range] rounds) | weights MiB | peak RSS growth MiB | warm-up s | greedy tokens identical | "
            "loss change | acceptance |\n|---|---|---|---|---|---|---|---|---|---|---|---|")
    lines = [head]
    for r in rows:
        s = r.setting
        if r.status != "ok":
            lines.append(f"| {s.name} | {r.status} |" + " |" * 11)
            continue
        fmt = lambda x, f: "" if isinstance(x, float) and math.isnan(x) else format(x, f)  # noqa: E731
        lines.append(
            f"| {s.name} | {fmt(r.prefill_ms, '.1f')} | {fmt(r.decode_ms_per_step, '.2f')} | {fmt(r.decode_tok_s, ',.0f')} "
            f"| {fmt(r.limit_ms_per_step, '.2f')} | {r.speed_vs_reference} | {fmt(r.weight_mib, '.1f')} "
            f"| {fmt(r.peak_mib, '.1f')} | {fmt(r.first_run_s, '.1f')} | {fmt(r.tokens_identical, '.0%')} | {fmt(r.loss_change, '+.4f')} "
            f"| {fmt(r.acceptance, '.0%')} |")
    return "\n".join(lines)


def svg_plot(rows: list[Row], meta: dict) -> str:
    """Decode tokens/s per setting (bars) and the bandwidth limit (ticks): a self-contained SVG."""
    ok = [r for r in rows if r.status == "ok" and not math.isnan(r.decode_tok_s)]
    limits = [r.setting.batch / (r.limit_ms_per_step / 1e3) if r.setting.kv_cache and not r.setting.speculative
              else math.nan for r in ok]
    top = max([r.decode_tok_s for r in ok] + [x for x in limits if not math.isnan(x)] + [1.0])
    scale = lambda v: 420 * math.log10(max(v, 1)) / math.log10(top * 1.2)  # noqa: E731
    bar_h, left = 22, 170
    height = 60 + bar_h * len(ok)
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="720" height="{height}" font-family="sans-serif" '
             'font-size="12">',
             f'<text x="10" y="18" font-weight="bold">Decode tokens/s (log scale), {meta["model"]}, '
             f'{meta["threads"]} thread(s), {meta["date"]}</text>',
             '<text x="10" y="34" fill="#555">bars: measured (median over rounds); red tick: weight bytes / '
             'measured bandwidth</text>']
    for i, (r, limit) in enumerate(zip(ok, limits)):
        y = 46 + i * bar_h
        parts.append(f'<text x="{left - 6}" y="{y + 14}" text-anchor="end">{r.setting.name}</text>')
        parts.append(f'<rect x="{left}" y="{y + 3}" width="{scale(r.decode_tok_s):.1f}" height="{bar_h - 6}" '
                     'fill="#4c78a8"/>')
        parts.append(f'<text x="{left + scale(r.decode_tok_s) + 4:.1f}" y="{y + 14}">{r.decode_tok_s:,.0f}</text>')
        if not math.isnan(limit):
            x = left + scale(limit)
            parts.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{y + 1}" y2="{y + bar_h - 1}" stroke="#d62728" '
                         'stroke-width="3"/>')
    parts.append("</svg>")
    return "\n".join(parts)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="gpt2-small", help="preset name, hooked-gpt2 checkpoint dir or Hugging Face dir")
    p.add_argument("--draft", default="mini", help="the draft model for speculative decoding (same vocabulary)")
    p.add_argument("--prompt-len", type=int, default=16, help="prompt tokens per sequence")
    p.add_argument("--new-tokens", type=int, default=16, help="tokens generated per sequence")
    p.add_argument("--rounds", type=int, default=3, help="timed rounds (every setting once per round)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (default 1: on a shared machine more threads time the scheduler)")
    p.add_argument("--only", nargs="+", help="settings to run (the reference row always runs)")
    p.add_argument("--skip", nargs="+", help="settings to leave out (e.g. compiled, where compiling is too slow)")
    p.add_argument("--eval-tokens", help="a torch-saved [batch pos] tensor of held-out token ids for the loss "
                                         "change (default: uniform random ids, all a random-weight preset has)")
    p.add_argument("--out", help="write table.md, results.json and decode.svg into this directory")
    p.add_argument("--quick", action="store_true", help="tiny models, few tokens, one round: seconds (the test's mode)")
    args = p.parse_args(argv)
    if args.quick:
        args.model, args.draft = "tiny", "tiny"
        args.prompt_len, args.new_tokens, args.rounds = 8, 6, 1
        args.skip = sorted(set(args.skip or []) | {"compiled"})
    if args.new_tokens < 2:
        p.error("--new-tokens must be at least 2 (decode is timed as all new tokens but the first)")
    return args


def main(argv=None) -> list[Row]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    keep_freed_memory()
    rows, meta = run_study(args)
    text = table(rows, meta)
    print(json.dumps(meta))
    print(text)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "table.md").write_text(text + "\n")
        (out / "decode.svg").write_text(svg_plot(rows, meta))
        (out / "results.json").write_text(json.dumps(
            {"meta": meta, "args": vars(args),
             "rows": [{**asdict(r), "setting": asdict(r.setting)} for r in rows]}, indent=1, default=str))
    return rows


if __name__ == "__main__":
    main()

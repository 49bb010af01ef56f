"""This checkout's HookedGPT2 against the same model at another commit (default: main),
in one process, on the same weights, timed round-robin so that load from elsewhere on
the machine falls on both alike. It shows whether a change slowed the model down:

1. forward+backward with no hooks attached (the training fast path);
2. a forward pass with 4 hooks per block that return an edited tensor (each return value
   is checked against the activation's shape since issue 24);
3. run_with_cache of every hook, under inference_mode.

Each line prints the median over rounds of this checkout's time over the reference's.

Run: python benchmarks/bench_against_ref.py [--ref main] [--repeats N] [--threads N]
"""

import argparse
import importlib
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from benchmarks.common import interleaved_times, medians, paired_ratio  # noqa: E402

import hooked_gpt2  # noqa: E402  (this checkout's)


def reference_package(ref: str, into: Path):
    """``hooked_gpt2`` as it is at git ``ref``, imported as ``hooked_gpt2_ref`` (its
    imports are relative, so it runs under another name)."""
    archive = into / "ref.tar"
    subprocess.run(["git", "-C", str(ROOT), "archive", "-o", str(archive), ref, "hooked_gpt2"], check=True)
    with tarfile.open(archive) as tar:
        tar.extractall(into, filter="data")
    (into / "hooked_gpt2").rename(into / "hooked_gpt2_ref")
    sys.path.insert(0, str(into))
    return importlib.import_module("hooked_gpt2_ref")


def train_step(model, tokens):
    def step():
        model.zero_grad(set_to_none=True)
        logits = model(tokens[:, :-1])
        F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten()).backward()

    return step


def editing_hooks(model, tokens):
    def edit(activation, hook):
        return activation * 1.0  # a new tensor back: the checked path

    ends = ("hook_resid_pre", "attn.hook_z", "hook_attn_out", "hook_mlp_out")
    hooks = [(name, edit) for name in model.hook_dict if name.endswith(ends)]
    return lambda: model.run_with_hooks(tokens[:, :-1], fwd_hooks=hooks)


def report(label: str, times: dict[str, list[float]]) -> None:
    t = medians(times)
    print(f"{label}: this checkout {t['this'] * 1e3:.0f} ms, reference {t['ref'] * 1e3:.0f} ms (medians); "
          f"median ratio within a round {paired_ratio(times['this'], times['ref']):.3f} (target <= 1.0 within noise)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ref", default="main", help="git commit or branch to compare against (default: main)")
    parser.add_argument("--repeats", type=int, default=15, help="timed rounds per measurement (median taken)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        ref = reference_package(args.ref, Path(tmp))
        torch.manual_seed(0)
        shape = dict(n_layers=4, d_model=256, n_heads=8, n_ctx=256)
        this = hooked_gpt2.HookedGPT2(hooked_gpt2.GPT2Config(**shape))
        other = ref.HookedGPT2(ref.GPT2Config(**shape))
        other.load_state_dict(this.state_dict())
        tokens = torch.randint(0, this.cfg.d_vocab, (4, 129))
        print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; against {args.ref}; model "
              f"{shape['n_layers']} layers, d_model {shape['d_model']}; batch 4 x 128 tokens, fp32 CPU\n")
        report("1. forward+backward, no hooks", interleaved_times(
            {"this": train_step(this, tokens), "ref": train_step(other, tokens)}, args.repeats, until_steady=3))
        this.eval(), other.eval()
        with torch.inference_mode():
            report("2. forward, 4 editing hooks per block", interleaved_times(
                {"this": editing_hooks(this, tokens), "ref": editing_hooks(other, tokens)}, args.repeats))
            report("3. run_with_cache, every hook", interleaved_times(
                {"this": lambda: this.run_with_cache(tokens[:, :-1]), "ref": lambda: other.run_with_cache(tokens[:, :-1])},
                args.repeats))


if __name__ == "__main__":
    main()

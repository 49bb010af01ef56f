"""``python -m hooked_gpt2``: generate text from a checkpoint (or a fresh model)."""

import argparse
import sys

import torch

from . import CheckpointError, ConfigError, GPT2Config, HookedGPT2
from .config import PRESETS
from .device import resolve_device


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m hooked_gpt2", description=__doc__)
    parser.add_argument("--checkpoint", help="a save_pretrained directory (a training run's checkpoints/step_*)")
    parser.add_argument("--hf", help="a Hugging Face GPT-2 directory, e.g. OpenAI's weights on disk")
    parser.add_argument("--preset", default="tiny", choices=sorted(PRESETS),
                        help="shape of a freshly initialised model, used when no checkpoint is given")
    parser.add_argument("--prompt", default="Every effort moves you", help="text to continue")
    parser.add_argument("--max-new-tokens", type=int, default=30, help="how many tokens to generate")
    parser.add_argument("--temperature", type=float, default=0.8, help="sampling temperature; 0 is greedy")
    parser.add_argument("--top-k", type=int, default=None, help="sample only from the k most likely tokens")
    parser.add_argument("--top-p", type=float, default=None, help="nucleus sampling: smallest set with this mass")
    parser.add_argument("--seed", type=int, default=0, help="random seed (initialisation and sampling)")
    parser.add_argument("--device", default="auto",
                        help="auto (a CUDA GPU if there is one, else the CPU; the default, as in training), "
                             "cpu, cuda or cuda:N")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    try:
        if args.checkpoint:
            model = HookedGPT2.from_pretrained(args.checkpoint)
        elif args.hf:
            model = HookedGPT2.from_hf(args.hf)
        else:
            print(f"(no checkpoint given: a freshly initialised {args.preset!r} model, so expect noise)",
                  file=sys.stderr)
            model = HookedGPT2(GPT2Config.preset(args.preset)).eval()
        model = model.to(resolve_device(args.device))
        print(model.generate(args.prompt, args.max_new_tokens, temperature=args.temperature,
                             top_k=args.top_k, top_p=args.top_p, seed=args.seed))
    except (CheckpointError, ConfigError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

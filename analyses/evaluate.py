"""Evaluate models beyond training loss: ``python -m analyses.evaluate --help``.

    python -m analyses.evaluate runs/demo/checkpoints/step_0003000 path/to/gpt2 --data data/python-stdlib
    python -m analyses.evaluate MODEL [MODEL ...] --data DIR --hellaswag hellaswag_val.jsonl --out eval.json

Each MODEL is one of our checkpoints, a ``save_hf`` export, or OpenAI's GPT-2 in a
Hugging Face directory on disk. Every model is scored on exactly the same tokens:

- **test loss**: mean next-token cross-entropy over consecutive, non-overlapping windows
  of ``seq_len + 1`` tokens from the start of the prepared data's held-out split (``val``),
  ``seq_len`` being the shortest context among the models unless given;
- **HellaSwag** (optional, from a local copy of its ``.jsonl``): each ending is scored by
  the summed log-probability of its tokens after the context; ``acc`` picks the ending
  with the highest sum, ``acc_norm`` the highest mean per token (the token-length
  normalisation of build-nanogpt and llm.c; lm-evaluation-harness divides by characters).

One table is printed; ``--out`` writes it as JSON. The results for each hooked-gpt2
checkpoint are also merged into ``evaluation.json`` beside it, where ``save_hf``'s model
card finds them.
"""

import argparse
import json
from pathlib import Path

import torch
from torch import Tensor
from tqdm import tqdm

from data_prep.reader import SPLITS, TokenDataset
from hooked_gpt2.atomic import atomic_write
from hooked_gpt2.checkpoint import FORMAT
from hooked_gpt2.losses import next_token_loss
from hooked_gpt2.model_card import EVALUATION_FILE

from .cli import DEVICE_HELP, load_model, run
from .common import AnalysisError, check_data_vocab


class HellaSwagError(AnalysisError):
    """A HellaSwag file that is not in the standard format; the message names the line."""


# Test loss.
def split_windows(data_dir: str | Path, split: str, seq_len: int, max_tokens: int | None = None) -> Tensor:
    """Consecutive windows ``[n, seq_len + 1]`` from the start of ``split`` (each window's
    last token is the next window's first), covering at most ``max_tokens`` predictions."""
    dataset = TokenDataset(data_dir, split)
    n = (len(dataset) - 1) // seq_len
    if max_tokens is not None:
        n = min(n, max_tokens // seq_len)
    if n < 1:
        raise AnalysisError(f"{data_dir} {split!r} split holds {len(dataset)} tokens, fewer than one window of "
                            f"{seq_len + 1}; give a smaller --seq-len or a larger --max-tokens")
    flat = torch.from_numpy(dataset.read(0, n * seq_len + 1))
    return flat.unfold(0, seq_len + 1, seq_len)


@torch.no_grad()
def loss_on_windows(model, windows: Tensor, batch_size: int = 8, progress: bool = False, desc: str = "") -> float:
    """Mean next-token cross-entropy of ``model`` over ``windows`` [n, seq_len + 1]."""
    device = next(model.parameters()).device
    if int(windows.max()) >= model.cfg.d_vocab:
        raise AnalysisError(f"the data holds token id {int(windows.max())}, outside {desc or 'the model'}'s "
                            f"vocabulary of {model.cfg.d_vocab}; evaluate on data made with its tokenizer")
    total, count = 0.0, 0
    for start in tqdm(range(0, len(windows), batch_size), desc=desc, disable=not progress, unit="batch"):
        batch = windows[start : start + batch_size].to(device)
        n = batch[:, 1:].numel()
        total += next_token_loss(model(batch[:, :-1]), batch).item() * n
        count += n
    return total / count


# HellaSwag.
def read_hellaswag(path: str | Path, limit: int | None = None) -> list[dict]:
    """The examples of a HellaSwag ``.jsonl`` (``ctx``, four ``endings``, ``label``), checked."""
    path = Path(path)
    if not path.is_file():
        raise HellaSwagError(f"no HellaSwag file at {path}; download hellaswag_val.jsonl "
                             "(github.com/rowanz/hellaswag, data/) and pass its path")
    examples = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise HellaSwagError(f"{where} is not JSON ({e}); each line must be one HellaSwag example") from None
        if not isinstance(row, dict):
            raise HellaSwagError(f"{where} is a {type(row).__name__}, not an object with ctx, endings and label")
        endings, label = row.get("endings"), row.get("label")
        problem = None
        if not (isinstance(row.get("ctx"), str) and row["ctx"].strip()):
            problem = "needs \"ctx\": the non-empty context string"
        elif not (isinstance(endings, list) and len(endings) == 4 and all(isinstance(e, str) and e for e in endings)):
            problem = "needs \"endings\": a list of 4 non-empty strings"
        elif isinstance(label, str) and label.isdigit():
            label = int(label)
        if problem is None and not (isinstance(label, int) and not isinstance(label, bool) and 0 <= label < 4):
            problem = f"needs \"label\": the index 0-3 of the right ending, got {label!r}"
        if problem:
            raise HellaSwagError(f"{where} {problem} (HellaSwag's format: ctx, endings, label)")
        examples.append({"ctx": row["ctx"], "endings": endings, "label": label})
        if limit is not None and len(examples) == limit:
            break
    if not examples:
        raise HellaSwagError(f"{path} holds no examples")
    return examples


def ending_rows(model, example: dict) -> tuple[list[list[int]], list[int]]:
    """Context + ending tokens for each of the four endings (cut from the left to the
    model's context), and how many tokens at each row's end are the ending's."""
    context = model.tokenizer.encode_ordinary(example["ctx"])
    rows, lengths = [], []
    for ending in example["endings"]:
        tokens = model.tokenizer.encode_ordinary(" " + ending)[: model.cfg.n_ctx]
        rows.append((context + tokens)[-(model.cfg.n_ctx + 1):])
        lengths.append(len(tokens))
    return rows, lengths


@torch.no_grad()
def ending_logprobs(model, rows: list[list[int]], lengths: list[int]) -> tuple[Tensor, Tensor]:
    """Summed and mean log-probability of each row's last ``length`` tokens, in one
    right-padded batch."""
    device = next(model.parameters()).device
    width = max(len(r) for r in rows)
    tokens = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width - 1)
    for i, (row, n) in enumerate(zip(rows, lengths)):
        tokens[i, : len(row)] = torch.tensor(row)
        mask[i, len(row) - 1 - n : len(row) - 1] = 1.0  # target positions of the ending's tokens
    logprobs = -next_token_loss(model(tokens[:, :-1].to(device)), tokens, per_token=True).cpu()
    total = (logprobs * mask).sum(1)
    return total, total / mask.sum(1)


def score_hellaswag(model, examples: list[dict], batch_size: int = 8, progress: bool = False, desc: str = "") -> dict:
    """``acc`` (highest summed log-probability) and ``acc_norm`` (highest per token) over
    ``examples``, ``batch_size`` examples (4 rows each) per forward pass."""
    predictions = []
    for start in tqdm(range(0, len(examples), batch_size), desc=desc, disable=not progress, unit="batch"):
        chunk = examples[start : start + batch_size]
        rows, lengths = [], []
        for example in chunk:
            r, n = ending_rows(model, example)
            rows += r
            lengths += n
        total, mean = ending_logprobs(model, rows, lengths)
        for i in range(len(chunk)):
            predictions.append((int(total[4 * i : 4 * i + 4].argmax()), int(mean[4 * i : 4 * i + 4].argmax())))
    labels = [e["label"] for e in examples]
    return {
        "acc": sum(p == y for (p, _), y in zip(predictions, labels)) / len(labels),
        "acc_norm": sum(p == y for (_, p), y in zip(predictions, labels)) / len(labels),
        "n": len(labels),
        "predictions": [p for p, _ in predictions],
        "predictions_norm": [p for _, p in predictions],
    }


# Several models, one table.
def evaluate_models(paths: list[str], data: str | None, *, split: str = "val", seq_len: int | None = None,
                    max_tokens: int | None = None, hellaswag: str | None = None, hellaswag_limit: int | None = None,
                    batch_size: int = 8, device: str = "auto", progress: bool = True) -> dict:
    """Test loss (and HellaSwag) of each model on the same tokens; returns the JSON table."""
    if data is None and hellaswag is None:
        raise AnalysisError("nothing to evaluate: give --data DIR (test loss) and/or --hellaswag FILE")
    examples = read_hellaswag(hellaswag, hellaswag_limit) if hellaswag else None
    models = {path: load_model(path, device) for path in paths}  # every model loads before any work starts
    if seq_len is None:
        seq_len = min(m.cfg.n_ctx for m in models.values())
    too_short = [p for p, m in models.items() if m.cfg.n_ctx < seq_len]
    if too_short:
        raise AnalysisError(f"--seq-len {seq_len} is longer than the context of {too_short}")
    if data:
        for path, model in models.items():
            check_data_vocab(model, data, str(path))
    windows = split_windows(data, split, seq_len, max_tokens) if data else None
    result = {"data": str(Path(data).resolve()) if data else None, "split": split, "seq_len": seq_len,
              "tokens": windows[:, 1:].numel() if windows is not None else 0,
              "hellaswag": str(Path(hellaswag).resolve()) if hellaswag else None, "models": []}
    for path, model in models.items():
        row = {"model": str(path), "n_params": model.cfg.n_params()}
        if windows is not None:
            row["test_loss"] = loss_on_windows(model, windows, batch_size, progress, desc=f"{Path(path).name} loss")
        if examples is not None:
            scores = score_hellaswag(model, examples, batch_size, progress, desc=f"{Path(path).name} hellaswag")
            row["hellaswag"] = {k: scores[k] for k in ("acc", "acc_norm", "n")}
        result["models"].append(row)
        record_beside(Path(path), result, row)
    return result


def record_beside(path: Path, result: dict, row: dict) -> None:
    """Merge ``row`` into ``evaluation.json`` beside a hooked-gpt2 checkpoint, keyed by what
    it was measured on (other data sets' results stay)."""
    try:
        ours = json.loads((path / "config.json").read_text()).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        ours = False
    if not ours:
        return
    file = path / EVALUATION_FILE
    try:
        saved = json.loads(file.read_text()) if file.is_file() else {}
    except (OSError, ValueError):
        saved = {}
    if "test_loss" in row:
        saved.setdefault("test_loss", {})[f"{result['data']}:{result['split']}"] = {
            "loss": row["test_loss"], "tokens": result["tokens"], "seq_len": result["seq_len"]}
    if "hellaswag" in row:
        saved.setdefault("hellaswag", {})[result["hellaswag"]] = row["hellaswag"]
    atomic_write(file, json.dumps(saved, indent=2) + "\n")


def table(result: dict) -> str:
    """The results as a Markdown table, one row per model."""
    header = ["model", "params"]
    if result["data"]:
        header.append(f"test loss ({result['tokens']:,} tokens)")
    if result["hellaswag"]:
        header += ["hellaswag acc", "acc_norm"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in result["models"]:
        cells = [row["model"], f"{row['n_params'] / 1e6:.1f}M"]
        if "test_loss" in row:
            cells.append(f"{row['test_loss']:.4f}")
        if "hellaswag" in row:
            cells += [f"{row['hellaswag']['acc']:.4f}", f"{row['hellaswag']['acc_norm']:.4f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m analyses.evaluate", description="Test loss on a prepared data set's held-out split, and HellaSwag "
                                            "accuracy, for several models on the same tokens; one table.")
    p.add_argument("models", nargs="+", help="checkpoint directories: ours (save_pretrained / training), "
                                             "save_hf exports, or Hugging Face GPT-2 directories")
    p.add_argument("--data", help="prepared data directory (python -m data_prep.prepare) for the test loss")
    p.add_argument("--split", default="val", choices=SPLITS, help="which split to score (default val, the held-out one)")
    p.add_argument("--seq-len", type=_positive_int, help="tokens per window (default the shortest model context)")
    p.add_argument("--max-tokens", type=_positive_int, help="score at most this many tokens (default the whole split)")
    p.add_argument("--hellaswag", help="local HellaSwag .jsonl (e.g. hellaswag_val.jsonl) to score")
    p.add_argument("--hellaswag-limit", type=_positive_int, help="score only the first N HellaSwag examples")
    p.add_argument("--batch-size", type=_positive_int, default=8, help="windows (or HellaSwag examples) per forward pass")
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    p.add_argument("--out", help="write the table as JSON to this file")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="hide the progress bars")
    args = p.parse_args(argv)
    result = evaluate_models(args.models, args.data, split=args.split, seq_len=args.seq_len, max_tokens=args.max_tokens,
                             hellaswag=args.hellaswag, hellaswag_limit=args.hellaswag_limit,
                             batch_size=args.batch_size, device=args.device, progress=args.progress)
    print(table(result))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        atomic_write(Path(args.out), json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    run(main)

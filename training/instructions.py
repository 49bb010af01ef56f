"""Instruction data for fine-tuning: Alpaca-format records, the prompt template, and
batches whose labels mask everything but the response.

A record is ``{"instruction": ..., "input": ..., "output": ...}`` (``input`` may be
empty or absent), in a JSON list or one per line (JSONL). The prompt is the template
filled with the instruction and input; the model learns to continue it with the output
followed by <|endoftext|>:

    >>> from hooked_gpt2.tokenizer import get_tokenizer
    >>> prompt = fill(ALPACA_TEMPLATE, {"instruction": "Add 2 and 3.", "input": "", "output": "5"})
    >>> prompt.endswith("### Instruction:\\nAdd 2 and 3.\\n\\n### Response:\\n")
    True
    >>> ex = encode(get_tokenizer(), prompt, "5", max_len=128)
    >>> inputs, labels = collate([ex], response_only=True)
    >>> [t for t in labels[0].tolist() if t != IGNORE]    # "5" and <|endoftext|>
    [20, 50256]
"""

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from hooked_gpt2.losses import IGNORE
from hooked_gpt2.tokenizer import EOT_TOKEN

# Stanford Alpaca's template (github.com/tatsu-lab/stanford_alpaca), in alpaca-lora's
# template-file format: a --template JSON file gives the same two keys.
ALPACA_TEMPLATE = {
    "prompt_input": "Below is an instruction that describes a task, paired with an input that provides further "
                    "context. Write a response that appropriately completes the request.\n\n"
                    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n",
    "prompt_no_input": "Below is an instruction that describes a task. Write a response that appropriately "
                       "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n",
}
FIELDS = re.compile(r"\{(instruction|input)\}")


class InstructionDataError(ValueError):
    """An instruction file or template that cannot be used; the message names the fix."""


def read_instructions(path: str | Path) -> list[dict]:
    """The records of an Alpaca-format ``.json`` (a list) or ``.jsonl`` file, checked."""
    path = Path(path)
    if not path.is_file():
        raise InstructionDataError(f"no instruction data at {path}: give an Alpaca-format .json or .jsonl file")
    text = path.read_text(encoding="utf-8")
    try:
        if text.lstrip().startswith("["):
            records = json.loads(text)
            where = [f"{path}: record {i}" for i in range(len(records))]
        else:
            lines = [(n, line) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
            records = [json.loads(line) for _, line in lines]
            where = [f"{path}:{n}" for n, _ in lines]
    except json.JSONDecodeError as e:
        raise InstructionDataError(f"{path} is neither a JSON list nor JSON lines ({e})") from None
    if not records:
        raise InstructionDataError(f"{path} holds no records")
    out = []
    for record, at in zip(records, where):
        if not isinstance(record, dict) or not isinstance(record.get("instruction"), str):
            raise InstructionDataError(f"{at} has no \"instruction\" string; Alpaca-format records are objects with "
                                       "\"instruction\", \"output\" and optionally \"input\"")
        if not isinstance(record.get("output"), str):
            raise InstructionDataError(f"{at} has no \"output\" string (the response to learn)")
        if not isinstance(record.get("input", ""), str):
            raise InstructionDataError(f"{at}: \"input\" must be a string (empty for none)")
        out.append({"instruction": record["instruction"], "input": record.get("input", ""), "output": record["output"]})
    return out


def read_template(path: str | Path | None) -> dict:
    """A template file (JSON with ``prompt_input`` and ``prompt_no_input``), or Alpaca's."""
    if path is None:
        return ALPACA_TEMPLATE
    try:
        template = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise InstructionDataError(f"cannot read template {path} ({e})") from None
    for key, needs in (("prompt_input", ("{instruction}", "{input}")), ("prompt_no_input", ("{instruction}",))):
        if not isinstance(template, dict) or not isinstance(template.get(key), str):
            raise InstructionDataError(f"template {path} needs a \"{key}\" string (see training/instructions.py)")
        missing = [n for n in needs if n not in template[key]]
        if missing:
            raise InstructionDataError(f"template {path}: \"{key}\" lacks {missing}")
    return {k: template[k] for k in ("prompt_input", "prompt_no_input")}


def fill(template: dict, record: dict) -> str:
    """The prompt for ``record``: braces in the record's text are left as they are."""
    text = template["prompt_input"] if record["input"] else template["prompt_no_input"]
    return FIELDS.sub(lambda m: record[m.group(1)], text)


@dataclass
class Example:
    tokens: list[int]  # prompt, response, <|endoftext|>; at most max_len + 1
    n_prompt: int  # how many of the tokens are the prompt's


def encode(tokenizer, prompt: str, response: str, max_len: int, eos_id: int = EOT_TOKEN) -> Example:
    """Prompt and response tokens then ``eos_id`` (<|endoftext|>, or its id in a compact
    vocabulary), cut to ``max_len + 1`` (``max_len`` inputs and targets)."""
    prompt_ids = tokenizer.encode_ordinary(prompt)
    tokens = (prompt_ids + tokenizer.encode_ordinary(response) + [eos_id])[: max_len + 1]
    return Example(tokens, min(len(prompt_ids), len(tokens)))


def collate(examples: list[Example], response_only: bool = True, pad_id: int = EOT_TOKEN) -> tuple[Tensor, Tensor]:
    """Inputs ``[batch, pos]`` right-padded with ``pad_id`` (<|endoftext|>), and next-token labels with
    padding (and, if ``response_only``, every target inside the prompt) set to IGNORE, for
    ``next_token_loss(logits, labels=labels)``."""
    width = max(len(e.tokens) for e in examples) - 1
    inputs = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    for i, e in enumerate(examples):
        row = torch.tensor(e.tokens)
        inputs[i, : len(row) - 1] = row[:-1]
        labels[i, : len(row) - 1] = row[1:]
        if response_only:
            labels[i, : e.n_prompt - 1] = IGNORE  # targets that are prompt tokens
    return inputs, labels

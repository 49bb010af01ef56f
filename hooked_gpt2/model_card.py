"""The ``README.md`` model card that ``save_hf`` writes beside an export.

It says what the model is from what lies beside the checkpoint it came from:

    RUN/config.json                        the run's settings (training.train or training.finetune)
    RUN/checkpoints/step_N/state.json      step, tokens seen, losses at that step
    RUN/checkpoints/step_N/evaluation.json results of python -m analyses.evaluate

Any of these may be missing (a model built in a notebook has none); the card then says
only what the model's own config tells.
"""

import json
from pathlib import Path

from .config import GPT2Config
from .tokenizer import D_VOCAB

EVALUATION_FILE = "evaluation.json"  # written by analyses.evaluate beside a checkpoint

# The choices the reference study varies, and GPT-2's own value of each (None: no default).
ARCHITECTURE_CHOICES = [("dropout", 0.1), ("qkv_bias", True), ("tie_embeddings", True), ("act_fn", "gelu_new"),
                        ("attn_only", False), ("positional", "learned"), ("norm", "layernorm"), ("mlp", "gelu"),
                        ("qk_norm", False)]
TRAINING_CHOICES = [("precision", None), ("lr", None), ("min_lr", None), ("schedule", None),
                    ("warmup_steps", None), ("weight_decay", None), ("grad_clip", None), ("seed", None)]


def _read(path: Path | None) -> dict:
    try:
        data = json.loads(path.read_text()) if path is not None and path.is_file() else {}
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def run_files(source: str | Path | None) -> tuple[dict, dict, dict]:
    """(run config, state, evaluation) found beside checkpoint ``source``; empty when absent."""
    if source is None:
        return {}, {}, {}
    source = Path(source)
    run_config = _read(source.parent.parent / "config.json") if source.parent.name == "checkpoints" else {}
    return run_config, _read(source / "state.json"), _read(source / EVALUATION_FILE)


def _cell(value) -> str:
    text = json.dumps(value) if isinstance(value, (dict, list, bool)) or value is None else str(value)
    return text.replace("|", "\\|").replace("\n", " ")


NATIVE = ("GPT2LMHeadModel", "LlamaForCausalLM")  # classes transformers has: no remote code


def _export_plan(cfg: GPT2Config) -> tuple[str, list[str]]:
    from .hf_interop import export_plan  # which imports this module

    return export_plan(cfg)


def remote_code(cfg: GPT2Config, architecture: str) -> tuple[bool, bool]:
    """Whether the model and the tokenizer of an export as ``architecture`` need ``trust_remote_code=True``."""
    return architecture not in NATIVE, cfg.vocab is not None


def usage(cfg: GPT2Config, architecture: str) -> list[str]:
    """The card's "How to use" section for an export as class ``architecture``: whether
    remote code is needed and why, what the vocabulary is, and the commands that load it."""
    planned, reasons = _export_plan(cfg)
    lines = ["## How to use", ""]
    if architecture in NATIVE:
        lines.append(f"The weights load as `transformers`' own `{architecture}`, an exactly equivalent model.")
    else:
        why = (f"No `transformers` class computes this architecture exactly: {'; '.join(reasons)}." if reasons else
               f"It was exported with its own code on request (it would also load as `{planned}`).")
        lines.append(f"{why} This directory carries its own modeling code (`modeling_hooked_gpt2.py`, "
                     f"`configuration_hooked_gpt2.py`; class `{architecture}`, torch and transformers only), and "
                     "loading it requires `trust_remote_code=True`: read the code before you trust it.")
    if cfg.vocab is not None:
        lines += ["", f"The vocabulary is compact: {len(cfg.vocab):,} token ids, each standing for the GPT-2 token "
                  f"listed in `compact_vocab.json`, except id {cfg.vocab.index(-1)}, which stands for every other "
                  "GPT-2 token and decodes to `<|other|>`. Its tokenizer (`tokenization_hooked_gpt2.py`) runs "
                  "GPT-2's byte-pair encoding and maps it to these ids, so it too needs `trust_remote_code=True`."]
    elif cfg.d_vocab == D_VOCAB:
        lines += ["", "It uses GPT-2's tokenizer (50,257 tokens), whose files are included."]
    else:
        lines += ["", f"Its {cfg.d_vocab:,} token ids belong to no tokenizer: it reads and writes token ids only."]
    model_code, tokenizer_code = remote_code(cfg, architecture)

    def trust(needed: bool) -> str:
        return ", trust_remote_code=True" if needed else ""

    lines += ["", "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline", "",
              f'model = AutoModelForCausalLM.from_pretrained("THIS_REPO"{trust(model_code)})']
    if cfg.vocab is not None or cfg.d_vocab == D_VOCAB:
        lines += [f'tokenizer = AutoTokenizer.from_pretrained("THIS_REPO"{trust(tokenizer_code)})',
                  f'generator = pipeline("text-generation", model="THIS_REPO"{trust(model_code or tokenizer_code)})',
                  'print(generator("def main(", max_new_tokens=20, do_sample=False)[0]["generated_text"])']
    lines += ["```", "", "With hooked-gpt2, for its hooks and analyses: `HookedGPT2.from_hf(local_directory)` "
              "(after `hf download THIS_REPO --local-dir local_directory`) gives back the same model exactly.", ""]
    return lines


def model_card(cfg: GPT2Config, source: str | Path | None = None, name: str | None = None,
               architecture: str | None = None) -> str:
    """Markdown with Hugging Face front matter describing the model ``cfg`` exported from
    checkpoint directory ``source`` as Hugging Face class ``architecture`` (by default the
    one ``save_hf`` chooses).

    >>> print(model_card(GPT2Config.preset("tiny")).splitlines()[5])
    # hooked-gpt2 model
    """
    run_config, state, evaluation = run_files(source)
    title = name or (Path(run_config["out"]).name if run_config.get("out") else "hooked-gpt2 model")
    architecture = architecture or _export_plan(cfg)[0]
    tags = "[gpt2, hooked-gpt2, custom_code]" if any(remote_code(cfg, architecture)) else "[gpt2, hooked-gpt2]"
    lines = ["---", "library_name: transformers", "pipeline_tag: text-generation", f"tags: {tags}", "---",
             f"# {title}", "",
             f"A GPT-2 architecture language model of {cfg.n_params() / 1e6:.2f}M parameters "
             f"({cfg.n_params(embeddings=False) / 1e6:.2f}M outside the embeddings), trained with hooked-gpt2.", ""]
    lines += usage(cfg, architecture)
    lines += ["## Architecture", "", "| setting | value |", "|---|---|"]
    lines += [f"| {k} | {_cell(v) if k != 'vocab' or v is None else f'compact, {len(v):,} ids (compact_vocab.json)'} |"
              for k, v in cfg.to_dict().items()]
    changed = [f"{k}={_cell(getattr(cfg, k))}" for k, gpt2 in ARCHITECTURE_CHOICES if getattr(cfg, k) != gpt2]
    lines += ["", "Differs from OpenAI's GPT-2 in: " + (", ".join(changed) if changed else "nothing of "
              + ", ".join(k for k, _ in ARCHITECTURE_CHOICES)) + ".", ""]
    if run_config:
        lines += ["## Training", ""]
        if "init" in run_config:
            lines.append(f"Fine-tuned from `{run_config['init']}` on instruction data `{run_config.get('data')}` "
                         f"(loss on {'response tokens only' if run_config.get('response_loss_only') else 'whole sequences'}).")
        else:
            lines.append(f"Trained from scratch (preset `{run_config.get('preset')}`) on `{run_config.get('data')}`.")
        if state:
            seen = "token positions (padding included)" if "init" in run_config else "tokens"
            val = state.get("val_loss")
            lines.append(f"This checkpoint is step {state.get('step')} of {run_config.get('max_steps')}, after "
                         f"{state.get('tokens_seen', 0):,} {seen}; validation loss "
                         f"{'n/a' if val is None else f'{val:.4f}'}.")
        lines += ["", "Settings: " + ", ".join(f"{k}={_cell(run_config[k])}" for k, _ in TRAINING_CHOICES
                                                if k in run_config) + ".", "",
                  "<details><summary>The run's full config.json</summary>", "", "| key | value |", "|---|---|"]
        lines += [f"| {k} | {_cell(v)} |" for k, v in run_config.items() if k != "derived"]
        lines += ["", "</details>", ""]
    lines += ["## Evaluation", ""]
    results = []
    for data, r in evaluation.get("test_loss", {}).items():
        results.append(f"| test loss | `{data}` | {r['loss']:.4f} ({r['tokens']:,} tokens, windows of {r['seq_len']}) |")
    for data, r in evaluation.get("hellaswag", {}).items():
        results.append(f"| HellaSwag acc / acc_norm | `{data}` | {r['acc']:.4f} / {r['acc_norm']:.4f} ({r['n']} examples) |")
    if results:
        lines += ["| metric | data | value |", "|---|---|---|", *results, ""]
    else:
        lines += ["No evaluation results were found beside the checkpoint "
                  "(`python -m analyses.evaluate CHECKPOINT --data DIR` writes them).", ""]
    lines += ["## Limitations", "",
              "A small research model: it continues text in the style of its training data, states falsehoods "
              "fluently, and has had no safety tuning.", ""]
    return "\n".join(lines)

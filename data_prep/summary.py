"""The closing report of a preparation run: what was written and what it can train.

Compute-optimal training (Hoffmann et al. 2022, "Chinchilla") uses about 20 tokens per
parameter, so a token count says which model size it suits.
"""

TOKENS_PER_PARAMETER = 20

# Parameter counts of the model presets (embeddings included). Hard-coded because the
# model config module is written in parallel; keep in step with hooked_gpt2's presets.
PRESET_PARAMETERS = {
    "gpt2-small": 124_439_808,  # tied embedding and unembedding, as OpenAI's GPT-2
    "gpt2-small-untied": 163_009_536,  # plus a separate W_U [d_model, d_vocab]
    "gpt2-medium": 354_823_168,
}


def human(n: float) -> str:
    """3_200_000_000 -> '3.20B'."""
    for scale, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{suffix}"
    return f"{n:.0f}"


def chinchilla_parameters(tokens: int) -> float:
    return tokens / TOKENS_PER_PARAMETER


def format_summary(manifest: dict, seconds: float) -> str:
    train, val = manifest["splits"]["train"], manifest["splits"]["val"]
    tokens = train["tokens"] + val["tokens"]
    stats = manifest["source_stats"]
    lines = [
        f"prepared {manifest['source']} in {seconds:.1f}s "
        f"({human(tokens / max(seconds, 1e-9))} tokens/s)",
        f"  train: {train['tokens']:,} tokens, {train['documents']:,} documents, "
        f"{len(train['shards'])} shard(s)",
        f"  val:   {val['tokens']:,} tokens, {val['documents']:,} documents, "
        f"{len(val['shards'])} shard(s)",
    ]
    if stats["replaced_characters"]:
        lines.append(f"  replaced {stats['replaced_characters']:,} undecodable byte sequence(s) with U+FFFD "
                     f"in {stats['files_with_replacements']:,} file(s) or record(s)")
    if stats["empty_documents"] or stats["filtered_documents"]:
        lines.append(f"  skipped {stats['empty_documents']:,} empty and "
                     f"{stats['filtered_documents']:,} filtered documents")
    lines.append(f"  Chinchilla-optimal model for {human(train['tokens'])} training tokens "
                 f"({TOKENS_PER_PARAMETER} tokens/parameter): {human(chinchilla_parameters(train['tokens']))} parameters")
    for name, params in PRESET_PARAMETERS.items():
        need = params * TOKENS_PER_PARAMETER
        lines.append(f"  {name:<18} ({human(params)} params) needs {human(need)} tokens: "
                     f"{train['tokens'] / need:.1%} of that here")
    return "\n".join(lines)

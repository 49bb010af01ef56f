"""The closing report of a preparation run: what was written and what it can train.

Compute-optimal training (Hoffmann et al. 2022, "Chinchilla") uses about 20 tokens per
parameter, so a token count says which model size it suits.
"""

from hooked_gpt2.config import GPT2Config  # torch-free

TOKENS_PER_PARAMETER = 20
# The presets the summary sizes the data against (parameter counts from their configs).
SUMMARY_PRESETS = ("gpt2-small", "gpt2-small-untied", "gpt2-medium")


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
    if manifest["source_info"].get("documents"):
        lines.append(f"  documents: {manifest['source_info']['documents']}")
    if stats["replaced_characters"]:
        lines.append(f"  replaced {stats['replaced_characters']:,} undecodable byte sequence(s) with U+FFFD "
                     f"in {stats['files_with_replacements']:,} file(s) or record(s)")
    if stats["empty_documents"] or stats["filtered_documents"]:
        lines.append(f"  skipped {stats['empty_documents']:,} empty and "
                     f"{stats['filtered_documents']:,} filtered documents")
    lines.append(f"  Chinchilla-optimal model for {human(train['tokens'])} training tokens "
                 f"({TOKENS_PER_PARAMETER} tokens/parameter): {human(chinchilla_parameters(train['tokens']))} parameters")
    for name in SUMMARY_PRESETS:
        params = GPT2Config.preset(name).n_params()
        need = params * TOKENS_PER_PARAMETER
        lines.append(f"  {name:<18} ({human(params)} params) needs {human(need)} tokens: "
                     f"{train['tokens'] / need:.1%} of that here")
    return "\n".join(lines)

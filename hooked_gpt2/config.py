"""GPT2Config: the shape of a GPT-2 and the interventions our studies vary, with presets."""

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path


class ConfigError(ValueError):
    """A configuration that cannot describe a GPT-2; the message says which field and why."""


# The fields that, together, turn GPT-2 into the Llama architecture (Hugging Face's
# LlamaForCausalLM, which hooked_gpt2/llama_interop.py imports and exports).
LLAMA_ARCHITECTURE = dict(
    positional="rotary", norm="rmsnorm", mlp="swiglu", qkv_bias=False, attn_bias=False, mlp_bias=False,
    tie_embeddings=False,
)
POSITIONALS = ("learned", "rotary")
NORMS = ("layernorm", "rmsnorm")
MLPS = ("gelu", "swiglu")

# Named shapes. gpt2-small is OpenAI's 124M model (tied embeddings, biases everywhere);
# gpt2-small-untied is the reference study's 163M baseline (untied, no QKV bias).
PRESETS: dict[str, dict] = {
    "gpt2-small": dict(n_layers=12, d_model=768, n_heads=12, dropout=0.1),
    "gpt2-small-untied": dict(
        n_layers=12, d_model=768, n_heads=12, dropout=0.1, qkv_bias=False, tie_embeddings=False
    ),
    "gpt2-medium": dict(n_layers=24, d_model=1024, n_heads=16, dropout=0.1),
    "gpt2-large": dict(n_layers=36, d_model=1280, n_heads=20, dropout=0.1),
    "gpt2-xl": dict(n_layers=48, d_model=1600, n_heads=25, dropout=0.1),
    # Small presets that train on a laptop CPU. On a CPU a GPT-2-vocabulary model's cost is
    # dominated by the 50k-token unembedding, so these stay narrow and short.
    # demo: the README's main job, the model in which an induction head forms on 2 CPU cores
    # (docs/induction-recipe.md): Olsson et al.'s two-layer attention-only transformer, with
    # rotary positions (with learned ones it finds positional shortcuts instead) and a short
    # context. At this size the 50k-token unembedding is nearly the whole cost of a step,
    # so width is almost free and tokens are what cost.
    "demo": dict(n_layers=2, d_model=64, n_heads=4, n_ctx=32, attn_only=True, positional="rotary",
                 tie_embeddings=False),
    # mini: a GPT-2 (MLPs, learned positions, tied embeddings) that trains on a CPU, the
    # scale of the CPU studies: d_model 128 with bf16 autocast trains ~2x faster per token
    # than 256 on 2 cores (see training/README.md).
    "mini": dict(n_layers=2, d_model=128, n_heads=4, n_ctx=256),
    "tiny": dict(n_layers=2, d_model=128, n_heads=4, n_ctx=128),
    "attn-only-2l": dict(n_layers=2, d_model=256, n_heads=8, n_ctx=256, attn_only=True),
    # mini's shape with the Llama architecture: RMSNorm, rotary positions, SwiGLU, no
    # biases, untied embeddings. d_mlp 344 (about 8/3 d_model, as Llama) gives SwiGLU's
    # three matrices the parameters of GPT-2's two at 4 d_model.
    "llama-style": dict(
        n_layers=2, d_model=128, n_heads=4, n_ctx=256, d_mlp=344, **LLAMA_ARCHITECTURE
    ),
}


@dataclass
class GPT2Config:
    """Every number that fixes a GPT-2's parameters, plus the interventions we study.

    >>> cfg = GPT2Config.preset("gpt2-small")
    >>> cfg.n_params() // 1_000_000
    124
    """

    n_layers: int = 12
    d_model: int = 768
    n_heads: int = 12
    d_head: int | None = None  # defaults to d_model // n_heads
    d_mlp: int | None = None  # defaults to 4 * d_model
    n_ctx: int = 1024
    d_vocab: int = 50257
    act_fn: str = "gelu_new"  # GPT-2's tanh approximation of GELU
    layer_norm_eps: float = 1e-5
    dropout: float = 0.0
    qkv_bias: bool = True
    tie_embeddings: bool = True
    attn_only: bool = False
    init_std: float = 0.02
    # Architecture variants; the defaults are GPT-2's, so an old config.json loads as GPT-2.
    positional: str = "learned"  # learned absolute embeddings, or rotary (RoPE) inside attention
    rotary_base: float = 10000.0
    rotary_dim: int | None = None  # dimensions of each head rotated; defaults to d_head with rotary
    norm: str = "layernorm"  # or rmsnorm (no centring, no bias)
    mlp: str = "gelu"  # or swiglu: silu(x W_gate) * (x W_in), d_mlp its hidden width
    qk_norm: bool = False  # RMSNorm of each head's queries and keys before the dot product
    attn_bias: bool = True  # bias of the attention output projection (QKV's is qkv_bias)
    mlp_bias: bool = True  # biases of the MLP's linear layers
    # A compact vocabulary (data_prep.compact): the GPT-2 id of each of the d_vocab token
    # ids, -1 for the one id standing for every other token; None: GPT-2's own ids.
    vocab: list | None = None

    # What TransformerLens code reads from ``model.cfg`` beyond the fields above. These are
    # class attributes, not dataclass fields, so they never reach config.json: the four
    # ``use_*`` switches and ``normalization_type`` are per-model run-time state (set by
    # ``model.set_use_attn_result`` and friends, and by weight processing); ``device`` and
    # ``dtype`` follow the model's parameters.
    use_attn_result = False  # cache / fire blocks.L.attn.hook_result
    use_split_qkv_input = False  # blocks.L.hook_q_input / hook_k_input / hook_v_input
    use_attn_in = False  # blocks.L.hook_attn_in
    use_hook_mlp_in = False  # blocks.L.hook_mlp_in
    normalization_type = "LN"  # "LNPre" once folded; "RMS" / "RMSPre" with rmsnorm (see __post_init__)
    device = None
    dtype = None
    # Constants of the architecture, under TransformerLens's names.
    positional_embedding_type = property(lambda self: "rotary" if self.positional == "rotary" else "standard")
    gated_mlp = property(lambda self: self.mlp == "swiglu")
    n_key_value_heads = None  # no grouped-query attention
    default_prepend_bos = True
    original_architecture = "GPT2LMHeadModel"
    model_name = "hooked-gpt2"
    final_rms = False
    output_logits_soft_cap = -1.0
    d_vocab_out = property(lambda self: self.d_vocab)
    eps = property(lambda self: self.layer_norm_eps)

    def __post_init__(self):
        if self.d_head is None and isinstance(self.n_heads, int) and self.n_heads > 0:
            self.d_head = self.d_model // self.n_heads
        if self.d_mlp is None and isinstance(self.d_model, int):
            self.d_mlp = 4 * self.d_model
        if self.rotary_dim is None and self.positional == "rotary":
            self.rotary_dim = self.d_head
        if self.norm == "rmsnorm":
            self.normalization_type = "RMS"
        self.validate()

    def validate(self) -> None:
        for name in ("n_layers", "d_model", "n_heads", "d_head", "d_mlp", "n_ctx", "d_vocab"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.d_model % self.n_heads:
            raise ConfigError(
                f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads}); "
                f"choose n_heads among {[h for h in range(1, 33) if self.d_model % h == 0]}"
            )
        if self.act_fn not in ("gelu_new", "gelu"):
            raise ConfigError(f"act_fn must be 'gelu_new' (GPT-2's) or 'gelu', got {self.act_fn!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout!r}")
        if not self.layer_norm_eps > 0:
            raise ConfigError(f"layer_norm_eps must be positive, got {self.layer_norm_eps!r}")
        for name, choices in (("positional", POSITIONALS), ("norm", NORMS), ("mlp", MLPS)):
            if getattr(self, name) not in choices:
                raise ConfigError(f"{name} must be one of {', '.join(choices)}, got {getattr(self, name)!r}")
        if self.vocab is not None:
            from .tokenizer import check_compact_vocab

            try:
                check_compact_vocab(self.vocab)
            except ValueError as e:
                raise ConfigError(f"vocab: {e}") from None
            if len(self.vocab) != self.d_vocab:
                raise ConfigError(f"vocab lists {len(self.vocab)} tokens but d_vocab is {self.d_vocab}; they must agree")
        if self.positional == "rotary":
            dim = self.rotary_dim
            if not (isinstance(dim, int) and not isinstance(dim, bool) and 0 < dim <= self.d_head and dim % 2 == 0):
                raise ConfigError(f"rotary_dim must be an even integer in [2, d_head={self.d_head}], got {dim!r}")
            if not self.rotary_base > 1:
                raise ConfigError(f"rotary_base must be greater than 1, got {self.rotary_base!r}")

    @classmethod
    def preset(cls, name: str, **overrides) -> "GPT2Config":
        """A named shape (see ``PRESETS``), with any field overridden."""
        if name not in PRESETS:
            raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})

    @classmethod
    def from_dict(cls, data: dict) -> "GPT2Config":
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - fields)
        if unknown:
            raise ConfigError(f"unknown config fields {unknown}; valid fields are {sorted(fields)}")
        return cls(**data)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def from_json(cls, path: str | Path) -> "GPT2Config":
        return cls.from_dict(json.loads(Path(path).read_text()))

    def n_params(self, embeddings: bool = True) -> int:
        """Parameter count; ``embeddings=False`` leaves out token and position embeddings
        and the unembedding (the count Chinchilla-style scaling laws use)."""
        d, h, dh, m = self.d_model, self.n_heads, self.d_head, self.d_mlp
        norm = d if self.norm == "rmsnorm" else 2 * d
        attn = d * 3 * h * dh + (3 * h * dh if self.qkv_bias else 0) + h * dh * d + (d if self.attn_bias else 0)
        attn += 2 * dh if self.qk_norm else 0
        matrices = 3 if self.mlp == "swiglu" else 2
        mlp_biases = (matrices - 1) * m + d if self.mlp_bias else 0
        mlp = 0 if self.attn_only else matrices * d * m + mlp_biases
        body = self.n_layers * (attn + mlp + norm * (1 if self.attn_only else 2)) + norm
        if not embeddings:
            return body
        embed = self.d_vocab * d + (self.n_ctx * d if self.positional == "learned" else 0)
        unembed = 0 if self.tie_embeddings else self.d_vocab * d
        return body + embed + unembed

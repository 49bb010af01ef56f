"""The configuration of a hooked-gpt2 model exported for ``transformers`` with its own
modeling code (``modeling_hooked_gpt2.py``, beside this file).

Its fields are hooked-gpt2's ``GPT2Config`` under the same names, so ``config.json`` reads
back into hooked-gpt2 exactly; ``attribute_map`` gives ``transformers`` its standard names
(``vocab_size``, ``hidden_size``, ...). Self-contained: it imports ``transformers`` only.
"""

from transformers import PretrainedConfig


class HookedGPT2Config(PretrainedConfig):
    """A GPT-2 with the variants hooked-gpt2 trains: positions ``learned`` or ``rotary``
    (over the first ``rotary_dim`` dimensions of each head), ``norm`` ``layernorm`` or
    ``rmsnorm``, ``mlp`` ``gelu`` or ``swiglu`` (or none: ``attn_only``), QK-norm, and each
    bias on or off. ``vocab``, when set, lists the GPT-2 id of each token id (-1 for the one
    id that stands for every other GPT-2 token): a compact vocabulary."""

    model_type = "hooked_gpt2"
    attribute_map = {
        "vocab_size": "d_vocab", "hidden_size": "d_model", "num_hidden_layers": "n_layers",
        "num_attention_heads": "n_heads", "head_dim": "d_head", "intermediate_size": "d_mlp",
        "max_position_embeddings": "n_ctx", "tie_word_embeddings": "tie_embeddings", "initializer_range": "init_std",
    }

    # GPT2Config's fields and defaults (GPT-2 small).
    n_layers: int = 12
    d_model: int = 768
    n_heads: int = 12
    d_head: int | None = None  # d_model // n_heads
    d_mlp: int | None = None  # 4 * d_model
    n_ctx: int = 1024
    d_vocab: int = 50257
    act_fn: str = "gelu_new"  # GPT-2's tanh approximation, or "gelu"
    layer_norm_eps: float = 1e-5
    dropout: float = 0.0
    qkv_bias: bool = True
    tie_embeddings: bool = True
    attn_only: bool = False
    init_std: float = 0.02
    positional: str = "learned"
    rotary_base: float = 10000.0
    rotary_dim: int | None = None  # d_head with rotary positions
    norm: str = "layernorm"
    mlp: str = "gelu"
    qk_norm: bool = False
    attn_bias: bool = True
    mlp_bias: bool = True
    vocab: list | None = None
    # What transformers reads.
    use_cache: bool = True
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None

    def __post_init__(self, **kwargs):
        if self.d_head is None:
            self.d_head = self.d_model // self.n_heads
        if self.d_mlp is None:
            self.d_mlp = 4 * self.d_model
        if self.rotary_dim is None and self.positional == "rotary":
            self.rotary_dim = self.d_head
        choices = {"positional": ("learned", "rotary"), "norm": ("layernorm", "rmsnorm"), "mlp": ("gelu", "swiglu"),
                   "act_fn": ("gelu_new", "gelu")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        super().__post_init__(**kwargs)

"""Text in and out of a HookedGPT2, with TransformerLens's names and defaults: GPT-2's BPE,
offline, where <|endoftext|> doubles as BOS and as padding. A model over a compact
vocabulary (``cfg.vocab``, from ``data_prep.compact``) reads and writes its own ids."""

import functools

import einops
import torch
from jaxtyping import Float, Int
from torch import Tensor

from .tokenizer import CompactTokenizer, GPT2Tokenizer


@functools.cache
def _tokenizer(vocab: tuple | None = None) -> GPT2Tokenizer:
    return GPT2Tokenizer() if vocab is None else CompactTokenizer(vocab)


class TextMixin:
    """Tokenizer helpers for a model with ``cfg`` (``n_ctx``, ``default_prepend_bos``),
    ``W_E`` and ``W_U``."""

    @property
    def tokenizer(self) -> GPT2Tokenizer:
        return _tokenizer(None if self.cfg.vocab is None else tuple(self.cfg.vocab))

    def to_tokens(
        self, text: str | list[str], prepend_bos: bool | None = None, padding_side: str | None = None,
        move_to_device: bool = True, truncate: bool = True,
    ) -> Int[Tensor, "batch pos"]:
        """Text to token ids; a list of strings is padded with <|endoftext|> (on the right
        unless ``padding_side="left"``). ``prepend_bos=None`` means the default, True, as in
        TransformerLens; ``<|endoftext|>`` written in the text is that special token.

        >>> model.to_tokens("Hello world", prepend_bos=False)
        tensor([[15496,   995]])
        """
        prepend_bos = self.cfg.default_prepend_bos if prepend_bos is None else prepend_bos
        padding_side = padding_side or "right"
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        texts = [text] if isinstance(text, str) else list(text)
        tokenizer = self.tokenizer
        ids = [tokenizer.encode(t, add_special_tokens=prepend_bos) for t in texts]
        if not any(ids):
            raise ValueError("the text is empty: give a non-empty prompt (or prepend_bos=True)")
        if truncate:
            ids = [row[: self.cfg.n_ctx] for row in ids]
        width = max(len(row) for row in ids)
        pad = lambda row: [tokenizer.pad_token_id] * (width - len(row))  # noqa: E731
        padded = [row + pad(row) if padding_side == "right" else pad(row) + row for row in ids]
        return torch.tensor(padded, dtype=torch.long, device=self.W_E.device if move_to_device else "cpu")

    def to_str_tokens(self, input, prepend_bos: bool | None = None, padding_side: str | None = None):
        """Each token as its own string, for labelling plots; a list of inputs gives a list
        of such lists."""
        if isinstance(input, list) and input and not isinstance(input[0], int):
            return [self.to_str_tokens(item, prepend_bos, padding_side) for item in input]
        if isinstance(input, str):
            tokens = self.to_tokens(input, prepend_bos=prepend_bos, padding_side=padding_side)[0]
        else:
            tokens = torch.as_tensor(input).squeeze()
            if tokens.dim() == 0:
                tokens = tokens[None]
            if tokens.dim() != 1:
                raise ValueError("to_str_tokens takes one sequence; index the batch first")
        return [self.tokenizer.decode([int(t)]) for t in tokens]

    def to_string(self, tokens) -> str | list[str]:
        """Decode ids back to text: an id or a sequence gives a string, [batch pos] a list."""
        tokens = torch.as_tensor(tokens)
        if tokens.dim() == 2:
            return [self.tokenizer.decode(row.tolist()) for row in tokens]
        return self.tokenizer.decode(tokens.reshape(-1).tolist())

    def to_single_token(self, string: str) -> int:
        """The id of a string that is one token (no BOS); raises if it is several."""
        ids = self.tokenizer.encode(string, add_special_tokens=False)
        if len(ids) != 1:
            raise ValueError(f"{string!r} is {len(ids)} tokens, not one: choose a single-token string")
        return ids[0]

    def to_single_str_token(self, int_token: int) -> str:
        return self.tokenizer.decode([int(int_token)])

    def get_token_position(self, single_token, input, mode: str = "first", prepend_bos: bool | None = None,
                           padding_side: str | None = None) -> int:
        """Where ``single_token`` (a string or an id) first (``mode="first"``) or last occurs
        in ``input`` (text, or ids of one sequence)."""
        tokens = self.to_tokens(input, prepend_bos, padding_side) if isinstance(input, str) else torch.as_tensor(input)
        if tokens.dim() == 2:
            if tokens.shape[0] != 1:
                raise ValueError(f"get_token_position takes one sequence, got a batch of {tokens.shape[0]}")
            tokens = tokens[0]
        token = self.to_single_token(single_token) if isinstance(single_token, str) else int(single_token)
        where = (tokens == token).nonzero()[:, 0]
        if len(where) == 0:
            raise ValueError(f"token {token} ({self.to_single_str_token(token)!r}) does not occur in the input")
        if mode not in ("first", "last"):
            raise ValueError(f"mode must be 'first' or 'last', got {mode!r}")
        return int(where[0] if mode == "first" else where[-1])

    def tokens_to_residual_directions(self, tokens) -> Float[Tensor, "... d_model"]:
        """The unembedding column of each token (``W_U[:, tokens]``, ids last-axis-free):
        a string or an id gives ``[d_model]``, ids ``[... d_model]``."""
        if isinstance(tokens, str):
            tokens = self.to_single_token(tokens)
        tokens = torch.as_tensor(tokens, device=self.W_U.device)
        if tokens.numel() == 1:
            tokens = tokens.reshape(())  # TransformerLens: any single id gives one direction
        return einops.rearrange(self.W_U[:, tokens], "d_model ... -> ... d_model")

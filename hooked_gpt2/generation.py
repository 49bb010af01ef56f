"""Autoregressive generation with a key/value cache.

The cache holds each layer's keys and values for the tokens seen so far, so each new
token costs one position's forward pass instead of the whole prefix's.
"""

import contextlib

import torch
from jaxtyping import Float, Int
from torch import Tensor, nn
from torch.nn import functional as F
from tqdm.auto import tqdm

from .tokenizer import EOT_TOKEN


class KVCache:
    """Keys and values of every layer, preallocated to ``max_len`` positions.

    Stored as [layer batch head_index pos d_head], the layout attention reads.
    """

    def __init__(self, cfg, batch: int, max_len: int, device, dtype):
        shape = (cfg.n_layers, batch, cfg.n_heads, max_len, cfg.d_head)
        self.keys = torch.empty(shape, device=device, dtype=dtype)
        self.values = torch.empty(shape, device=device, dtype=dtype)
        self.length = 0  # positions already stored; the model advances it after each forward
        # Set by generate_tokens once the prompt is in: the ids it feeds back are sampled over
        # d_vocab, so the model skips reading them back to check their range (a GPU sync per token).
        self.ids_in_range = False

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Store this step's keys and values; return all of them so far."""
        end = self.length + k.shape[2]
        self.keys[layer, :, :, self.length : end] = k
        self.values[layer, :, :, self.length : end] = v
        return self.keys[layer, :, :, :end], self.values[layer, :, :, :end]


def sample_next(
    logits: Float[Tensor, "batch d_vocab"], temperature: float, top_k: int | None, top_p: float | None,
    generator: torch.Generator | None, freq_penalty: float = 0.0, history: Int[Tensor, "batch pos"] | None = None,
) -> Int[Tensor, "batch"]:
    """One token per row: greedy at temperature 0, else sampled after top-k / top-p filtering.

    ``freq_penalty`` subtracts, after the temperature, that much per earlier occurrence of
    a token in ``history`` (TransformerLens's frequency penalty; sampling only)."""
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if freq_penalty:
        counts = torch.zeros_like(logits).scatter_add_(-1, history, torch.ones_like(history, dtype=logits.dtype))
        logits = logits - freq_penalty * counts
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None:
        sorted_logits, order = logits.sort(-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # Drop a token when the tokens ranked above it already hold top_p of the mass.
        drop = probs.cumsum(-1) - probs >= top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


def check_sampling_args(max_new_tokens, temperature, top_k, top_p) -> None:
    if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be a non-negative integer, got {max_new_tokens!r}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 is greedy), got {temperature}")
    if top_k is not None and (not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be a positive integer or None, got {top_k!r}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1] or None, got {top_p!r}")


@contextlib.contextmanager
def decoding_products(model):
    """For the length of the block, the model's linear layers compute products of a few
    rows (a decoding step) as one batched product over slices of the weight's rows; yields
    the unembedding, ``resid [rows d_model] -> logits [rows d_vocab]``, computed the same way.

    Decoding multiplies a few rows by every matrix, so each token streams every weight from
    memory once and the speed is memory bandwidth. On the CPU, MKL's plain matrix-vector
    product streams a weight at about 10 GB/s on one core; a batched product over two or
    more row slices of the same weight (views: nothing is copied) runs at 30 GB/s here,
    on one thread or two. Many-row products (prefill, training) keep ``F.linear``.
    GPU libraries stream either way well, so there nothing changes.
    """
    if model.W_E.device.type != "cpu" or not _plain_weight(model.unembed):
        yield lambda x: F.linear(x, model.unembed.weight, model.unembed.bias)
        return
    unembed = _SplitRows(model.unembed)
    patched = []
    try:
        for module in model.modules():
            if isinstance(module, nn.Linear) and module is not model.unembed and _plain_weight(module):
                module.forward = _SplitRows(module)
                patched.append(module)
        yield unembed
    finally:
        for module in patched:
            del module.forward


def _plain_weight(linear: nn.Linear) -> bool:
    """A dense weight; a quantised one (a tensor subclass, e.g. torchao's) keeps its own kernel."""
    return type(linear.weight.data) is torch.Tensor


class _SplitRows:
    """``F.linear(x, weight, bias)``; when x has at most ``MAX_ROWS`` rows, computed as
    ``weight @ x.T`` batched over ``parts`` slices of the weight's rows (views of it)."""

    MAX_ROWS = 16  # measured: the batched product wins up to here, F.linear beyond

    def __init__(self, linear: nn.Linear):
        self.weight, self.bias = linear.weight.detach(), linear.bias
        if self.bias is not None:
            self.bias = self.bias.detach()
        d_out, d_in = self.weight.shape
        self.parts = max(2, torch.get_num_threads())
        self.split = d_out - d_out % self.parts  # the rows the slices hold; the rest go alone
        # A view of a contiguous weight (as nn.Linear makes); a copy only of one that is not.
        self.slices = self.weight[: self.split].reshape(self.parts, -1, d_in)

    def linear(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight, self.bias)

    def __call__(self, x: Tensor) -> Tensor:
        rows = x.reshape(-1, x.shape[-1])
        if rows.shape[0] > self.MAX_ROWS or self.split == 0:
            return self.linear(x)
        columns = rows.T
        out = torch.bmm(self.slices, columns.expand(self.parts, *columns.shape)).view(self.split, -1)
        if self.split < self.weight.shape[0]:
            out = torch.cat([out, self.weight[self.split :] @ columns])
        out = out.T if self.bias is None else out.T + self.bias
        return out.reshape(*x.shape[:-1], self.weight.shape[0])


@torch.inference_mode()
def generate_tokens(
    model, tokens: Int[Tensor, "batch pos"], max_new_tokens: int, temperature: float = 1.0,
    top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
    stop_at_eos: bool = False, use_kv_cache: bool = True, eos_token_id: int = EOT_TOKEN,
    freq_penalty: float = 0.0, verbose: bool = False,
) -> Int[Tensor, "batch new_pos"]:
    check_sampling_args(max_new_tokens, temperature, top_k, top_p)
    n_ctx = model.cfg.n_ctx
    if tokens.shape[1] + max_new_tokens > n_ctx:
        raise ValueError(
            f"a prompt of {tokens.shape[1]} tokens plus {max_new_tokens} new tokens exceeds the "
            f"context of {n_ctx}; ask for at most {max(n_ctx - tokens.shape[1], 0)} new tokens"
        )
    generator = None
    if seed is not None:
        generator = torch.Generator(device=tokens.device).manual_seed(seed)
    was_training = model.training
    model.eval()
    try:
        with decoding_products(model) as unembed:
            kv_cache = None
            if use_kv_cache:
                kv_cache = KVCache(
                    model.cfg, tokens.shape[0], tokens.shape[1] + max_new_tokens, tokens.device, model.W_E.dtype
                )
            finished = torch.zeros(tokens.shape[0], dtype=torch.bool, device=tokens.device)
            out = tokens
            step_input = tokens
            for _ in tqdm(range(max_new_tokens), disable=not verbose):
                resid = model.final_residual(step_input if use_kv_cache else out, kv_cache=kv_cache)
                logits = unembed(resid[:, -1])  # only the last position: no other logits are read
                if kv_cache is not None:
                    kv_cache.ids_in_range = True
                next_token = sample_next(logits, temperature, top_k, top_p, generator, freq_penalty, out)
                if stop_at_eos:
                    next_token = next_token.masked_fill(finished, eos_token_id)
                    finished |= next_token == eos_token_id
                out = torch.cat([out, next_token[:, None]], dim=1)
                step_input = next_token[:, None]
                if stop_at_eos and bool(finished.all()):
                    break
            return out
    finally:
        model.train(was_training)


@torch.inference_mode()
def speculative_greedy(
    model, draft, tokens: Int[Tensor, "1 pos"], max_new_tokens: int, k: int = 4,
) -> tuple[Int[Tensor, "1 new_pos"], float]:
    """Greedy generation of ``model`` with ``draft`` proposing ``k`` tokens at a time; one
    forward of ``model`` checks them all and keeps the longest run it agrees with, plus its
    own next token. The tokens are ``model``'s greedy ones (up to ties between logits
    that batching rounds differently); also returns the fraction of drafted tokens kept.

    >>> out, acceptance = speculative_greedy(model, model, model.to_tokens("Hello"), 5)  # drafting for itself
    >>> acceptance
    1.0
    """
    tokens = model.check_tokens(tokens)
    check_sampling_args(max_new_tokens, 0.0, None, None)
    if tokens.shape[0] != 1:
        raise ValueError(f"speculative decoding here takes one sequence, got a batch of {tokens.shape[0]}: "
                         "rows accept different numbers of tokens, so generate them one at a time")
    if draft.cfg.d_vocab != model.cfg.d_vocab or draft.cfg.vocab != model.cfg.vocab:
        raise ValueError(f"the draft model's vocabulary ({draft.cfg.d_vocab} ids) is not the model's "
                         f"({model.cfg.d_vocab}): draft with a model trained on the same tokens")
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"k (tokens drafted per step) must be a positive integer, got {k!r}")
    end = tokens.shape[1] + max_new_tokens
    if end > min(model.cfg.n_ctx, draft.cfg.n_ctx):
        raise ValueError(f"a prompt of {tokens.shape[1]} tokens plus {max_new_tokens} new tokens exceeds the "
                         f"context of {min(model.cfg.n_ctx, draft.cfg.n_ctx)} (the smaller of the two models')")
    if max_new_tokens == 0:
        return tokens, float("nan")
    caches = {name: KVCache(m.cfg, 1, end, tokens.device, m.W_E.dtype) for name, m in (("model", model), ("draft", draft))}
    proposed = accepted = 0
    with contextlib.ExitStack() as stack:
        unembed = stack.enter_context(decoding_products(model))
        draft_unembed = unembed if draft is model else stack.enter_context(decoding_products(draft))
        out = torch.cat([tokens, unembed(model.final_residual(tokens, caches["model"])[:, -1]).argmax(-1)[:, None]], 1)
        for cache in caches.values():
            cache.ids_in_range = True
        # Invariant: each cache holds every token of ``out`` but the last, or fewer (the draft's).
        while out.shape[1] < end:
            drafted = min(k, end - out.shape[1] - 1)
            guesses = out
            for _ in range(drafted):
                step = guesses[:, caches["draft"].length :]
                guess = draft_unembed(draft.final_residual(step, caches["draft"])[:, -1]).argmax(-1)
                guesses = torch.cat([guesses, guess[:, None]], 1)
            checked = unembed(model.final_residual(guesses[:, caches["model"].length :], caches["model"])[0])
            wanted = checked.argmax(-1)  # the model's next token after each prefix
            drafts = guesses[0, out.shape[1] :]
            agree = int((drafts == wanted[:drafted]).long().cumprod(0).sum()) if drafted else 0
            proposed, accepted = proposed + drafted, accepted + agree
            out = torch.cat([out, drafts[None, :agree], wanted[None, agree : agree + 1]], 1)
            for cache in caches.values():  # forget the keys of rejected drafts
                cache.length = min(cache.length, out.shape[1] - 1)
    return out, accepted / proposed if proposed else float("nan")

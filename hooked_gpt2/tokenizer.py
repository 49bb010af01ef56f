"""GPT-2's byte-pair encoding through tiktoken, loaded from ranks shipped with the package.

``tiktoken.get_encoding("gpt2")`` downloads its files on first use, which fails offline
and on air-gapped clusters; the ranks here come from the openai-whisper source
distribution (see ``assets/README.md``) and are checked against a pinned sha256.
"""

import base64
import functools
import hashlib
from pathlib import Path

import tiktoken

RANKS_PATH = Path(__file__).parent / "assets" / "gpt2.tiktoken"
RANKS_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"
EOT_TOKEN = 50256
EOT_TEXT = "<|endoftext|>"
D_VOCAB = 50257
# A compact vocabulary (``data_prep.compact``) lists the GPT-2 id of each of a model's
# token ids; the one entry OTHER is the id that stands for every GPT-2 token not listed.
OTHER = -1
OTHER_TEXT = "<|other|>"

# GPT-2's pre-tokenisation pattern, as in tiktoken's own gpt2 definition.
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


@functools.cache
def load_ranks() -> dict[bytes, int]:
    """The mergeable ranks: token bytes -> id, verified against ``RANKS_SHA256``."""
    data = RANKS_PATH.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if digest != RANKS_SHA256:
        raise RuntimeError(
            f"{RANKS_PATH} has sha256 {digest}, expected {RANKS_SHA256}: the packaged "
            "tokenizer file is damaged; reinstall hooked-gpt2."
        )
    ranks = {}
    for line in data.splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


@functools.cache
def get_tokenizer() -> tiktoken.Encoding:
    """GPT-2's tokenizer, fully offline.

    >>> enc = get_tokenizer()
    >>> enc.encode("Hello world")
    [15496, 995]
    """
    return tiktoken.Encoding(
        name="gpt2",
        explicit_n_vocab=D_VOCAB,
        pat_str=GPT2_PATTERN,
        mergeable_ranks=load_ranks(),
        special_tokens={EOT_TEXT: EOT_TOKEN},
    )


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable characters (as in its encoder.py)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    n = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return dict(zip(printable, map(chr, chars)))


@functools.cache  # 0.7 s to derive; every save_hf with a tokenizer writes them
def hf_vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """The ranks as Hugging Face's ``vocab.json`` and ``merges.txt`` contents (shared:
    not to be modified).

    Each merge is recovered by running BPE on a token's bytes with only the ranks below
    its own: what is left is the pair that merges into it.
    """
    ranks = load_ranks()
    byte_encoder = bytes_to_unicode()

    def show(token: bytes) -> str:
        return "".join(byte_encoder[b] for b in token)

    merges = []
    for token, rank in sorted(ranks.items(), key=lambda item: item[1]):
        if len(token) == 1:
            continue
        parts = [bytes([b]) for b in token]
        while len(parts) > 2:
            pair_ranks = [
                (ranks.get(parts[i] + parts[i + 1], rank), i) for i in range(len(parts) - 1)
            ]
            best_rank, i = min(pair_ranks)
            assert best_rank < rank, f"token {token!r} cannot be built from lower ranks"
            parts[i : i + 2] = [parts[i] + parts[i + 1]]
        merges.append((show(parts[0]), show(parts[1])))
    vocab = {show(token): rank for token, rank in ranks.items()}
    vocab[EOT_TEXT] = EOT_TOKEN
    return vocab, merges


def tokenizer_sha256() -> str:
    """Identity of the tokenizer, recorded in data manifests."""
    return RANKS_SHA256


class GPT2Tokenizer:
    """GPT-2's tokenizer with what TransformerLens code uses from a Hugging Face one
    (``bos_token_id``, ``padding_side``, ``tokenizer(texts, return_tensors="pt",
    padding=True)``, ``decode``, ``batch_decode``), offline; every tiktoken method
    (``encode_ordinary``, ...) still works. As TransformerLens's ``model.tokenizer``,
    ``encode`` and calls prepend BOS unless ``add_special_tokens=False``, and treat
    ``<|endoftext|>`` written in the text as the special token.
    """

    bos_token_id = eos_token_id = pad_token_id = unk_token_id = EOT_TOKEN
    bos_token = eos_token = pad_token = unk_token = EOT_TEXT
    name_or_path = "gpt2"
    vocab_size = D_VOCAB

    def __init__(self):
        self.encoding = get_tokenizer()
        self.padding_side = "right"

    def __getattr__(self, name):  # tiktoken's own methods
        return getattr(self.encoding, name)

    def __len__(self) -> int:
        return D_VOCAB

    def encode(self, text: str, return_tensors: str | None = None, add_special_tokens: bool = True, **_):
        ids = ([self.bos_token_id] if add_special_tokens else []) + self.encode_text(text)
        if return_tensors == "pt":
            import torch

            return torch.tensor([ids])
        return ids

    def encode_text(self, text: str) -> list[int]:
        """The ids of ``text``, ``<|endoftext|>`` in it included, with no BOS added."""
        return self.encoding.encode(text, allowed_special="all")

    def decode(self, ids, skip_special_tokens: bool = False, **_) -> str:
        ids = [int(i) for i in (ids.reshape(-1).tolist() if hasattr(ids, "reshape") else ids)]
        if skip_special_tokens:
            ids = [i for i in ids if i != self.eos_token_id]
        return self.decode_ids(ids)

    def decode_ids(self, ids: list[int]) -> str:
        """The text of a list of ids, special tokens included."""
        return self.encoding.decode(ids)

    def batch_decode(self, rows, skip_special_tokens: bool = False, **_) -> list[str]:
        return [self.decode(row, skip_special_tokens) for row in rows]

    def __call__(self, text, return_tensors: str | None = None, padding: bool = False, add_special_tokens: bool = True,
                 **_):
        import torch

        texts = [text] if isinstance(text, str) else list(text)
        ids = [self.encode(t, add_special_tokens=add_special_tokens) for t in texts]
        if not padding:
            if return_tensors == "pt" and len({len(r) for r in ids}) > 1:
                raise ValueError("texts of different lengths need padding=True for return_tensors='pt'")
            rows = ids
            masks = [[1] * len(r) for r in ids]
        else:
            width = max(len(r) for r in ids)
            pad = lambda r: [self.pad_token_id] * (width - len(r))  # noqa: E731
            rows = [r + pad(r) if self.padding_side == "right" else pad(r) + r for r in ids]
            masks = [[1] * len(r) + [0] * (width - len(r)) if self.padding_side == "right"
                     else [0] * (width - len(r)) + [1] * len(r) for r in ids]
        if isinstance(text, str) and return_tensors != "pt":
            rows, masks = rows[0], masks[0]
        if return_tensors == "pt":
            rows, masks = torch.tensor(rows), torch.tensor(masks)
        return {"input_ids": rows, "attention_mask": masks}


def check_compact_vocab(vocab) -> None:
    """Raise ValueError unless ``vocab`` is a compact vocabulary: distinct GPT-2 ids, with
    ``<|endoftext|>`` (BOS, end of text and padding) among them and exactly one ``OTHER``."""
    if not isinstance(vocab, (list, tuple)) or not all(isinstance(i, int) and not isinstance(i, bool) for i in vocab):
        raise ValueError(f"a compact vocabulary is a list of GPT-2 token ids, got {type(vocab).__name__}")
    bad = [i for i in vocab if not (i == OTHER or 0 <= i < D_VOCAB)]
    if bad:
        raise ValueError(f"a compact vocabulary holds GPT-2 ids in [0, {D_VOCAB}) and one {OTHER}; got {bad[:5]}")
    if len(set(vocab)) != len(vocab):
        raise ValueError("a compact vocabulary lists each GPT-2 id once")
    if vocab.count(OTHER) != 1 or EOT_TOKEN not in vocab:
        raise ValueError(f"a compact vocabulary has exactly one {OTHER} (every other token) and holds "
                         f"<|endoftext|> ({EOT_TOKEN})")


def compact_table(vocab) -> list[int]:
    """``table[gpt2_id]``: the compact id of every GPT-2 id (``OTHER``'s for ids not listed)."""
    check_compact_vocab(vocab)
    table = [vocab.index(OTHER)] * D_VOCAB
    for compact_id, gpt2_id in enumerate(vocab):
        if gpt2_id != OTHER:
            table[gpt2_id] = compact_id
    return table


class CompactTokenizer(GPT2Tokenizer):
    """GPT-2's tokenizer for a model over a compact vocabulary (``data_prep.compact``):
    id ``i`` is GPT-2's ``vocab[i]``; every GPT-2 token not in ``vocab`` encodes to the
    one ``OTHER`` id, which decodes to ``<|other|>``.

    >>> tok = CompactTokenizer([EOT_TOKEN, 15496, OTHER])
    >>> tok.encode("Hello world")
    [0, 1, 2]
    >>> tok.decode([1, 2])
    'Hello<|other|>'
    """

    name_or_path = "gpt2-compact"

    def __init__(self, vocab):
        super().__init__()
        self.vocab = list(vocab)
        self.table = compact_table(self.vocab)
        self.other_token_id = self.vocab.index(OTHER)
        self.bos_token_id = self.eos_token_id = self.pad_token_id = self.unk_token_id = self.table[EOT_TOKEN]
        self.vocab_size = len(self.vocab)

    def __getattr__(self, name):  # tiktoken's methods would give GPT-2 ids, not this vocabulary's
        if name.startswith("__") or name in ("encoding", "vocab", "table"):
            raise AttributeError(name)
        raise AttributeError(f"a compact-vocabulary tokenizer has encode, encode_text, encode_ordinary and decode; "
                             f"not tiktoken's {name!r}")

    def __len__(self) -> int:
        return len(self.vocab)

    def encode_text(self, text: str) -> list[int]:
        return [self.table[i] for i in super().encode_text(text)]

    def encode_ordinary(self, text: str) -> list[int]:
        return [self.table[i] for i in self.encoding.encode_ordinary(text)]

    def decode_ids(self, ids: list[int]) -> str:
        bad = [i for i in ids if not 0 <= i < len(self.vocab)]
        if bad:
            raise ValueError(f"token id {bad[0]} is outside this compact vocabulary of {len(self.vocab)}")
        # Decode runs between OTHER ids together: one character can span several tokens.
        pieces, run = [], []
        for i in ids:
            if i == self.other_token_id:
                pieces += [self.encoding.decode(run), OTHER_TEXT]
                run = []
            else:
                run.append(self.vocab[i])
        return "".join(pieces) + self.encoding.decode(run)

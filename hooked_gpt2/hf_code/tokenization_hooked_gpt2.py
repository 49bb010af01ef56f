"""GPT-2's tokenizer over a compact vocabulary, for ``transformers.AutoTokenizer``.

A model trained over a compact vocabulary (hooked-gpt2's ``data_prep.compact``) reads
token id ``i`` as GPT-2's token ``ids[i]`` (``compact_vocab.json``), and one id, listed as
-1, as every GPT-2 token not listed. This tokenizer runs GPT-2's byte-pair encoding
(``vocab.json``, ``merges.txt``) and maps its ids to the model's; the catch-all id decodes
to ``<|other|>``. It gives the ids and text hooked-gpt2's ``CompactTokenizer`` gives
(``encode_text`` and ``decode``); as Hugging Face's GPT-2 tokenizer, it adds no BOS.
Self-contained: it imports ``tokenizers`` and ``transformers`` only.
"""

import json
import os
import shutil

from tokenizers import Tokenizer, pre_tokenizers
from tokenizers.models import BPE
from transformers import PreTrainedTokenizer

EOT_TEXT = "<|endoftext|>"
OTHER = -1  # the entry of compact_vocab.json that stands for every other GPT-2 token
OTHER_TEXT = "<|other|>"
VOCAB_FILES = {"vocab_file": "vocab.json", "merges_file": "merges.txt", "compact_vocab_file": "compact_vocab.json"}


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from bytes to the printable characters vocab.json spells them with."""
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


class CompactGPT2Tokenizer(PreTrainedTokenizer):
    vocab_files_names = VOCAB_FILES
    model_input_names = ["input_ids", "attention_mask"]

    def __init__(self, vocab_file, merges_file, compact_vocab_file, bos_token=EOT_TEXT, eos_token=EOT_TEXT,
                 unk_token=EOT_TEXT, pad_token=EOT_TEXT, **kwargs):
        self.vocab_file, self.merges_file, self.compact_vocab_file = vocab_file, merges_file, compact_vocab_file
        with open(vocab_file, encoding="utf-8") as f:
            gpt2_vocab = json.load(f)  # GPT-2 token (byte-level spelling) -> GPT-2 id
        with open(compact_vocab_file, encoding="utf-8") as f:
            self.compact_ids = json.load(f)["ids"]
        if self.compact_ids.count(OTHER) != 1:
            raise ValueError(f"{compact_vocab_file} must list {OTHER} (every other GPT-2 token) exactly once")
        self.other_id = self.compact_ids.index(OTHER)
        gpt2_tokens = {i: token for token, i in gpt2_vocab.items()}
        compact = {gpt2_id: i for i, gpt2_id in enumerate(self.compact_ids) if gpt2_id != OTHER}
        # Every GPT-2 token -> this vocabulary's id; each id -> its token.
        self.encoder = {token: compact.get(i, self.other_id) for token, i in gpt2_vocab.items()}
        self.decoder = [OTHER_TEXT if i == OTHER else gpt2_tokens[i] for i in self.compact_ids]
        self.byte_decoder = {c: b for b, c in bytes_to_unicode().items()}
        self.bpe = Tokenizer(BPE.from_file(vocab_file, merges_file))
        self.bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)  # GPT-2's pattern
        kwargs.setdefault("special_tokens_pattern", "none")  # no BOS added, as GPT-2's tokenizer
        kwargs.setdefault("clean_up_tokenization_spaces", False)
        super().__init__(bos_token=bos_token, eos_token=eos_token, unk_token=unk_token, pad_token=pad_token,
                         **kwargs)

    @property
    def vocab_size(self) -> int:
        return len(self.compact_ids)

    def get_vocab(self) -> dict[str, int]:
        return {token: i for i, token in enumerate(self.decoder)}

    def _tokenize(self, text, **kwargs) -> list[str]:
        return self.bpe.encode(text, add_special_tokens=False).tokens

    def _convert_token_to_id(self, token: str) -> int:
        return self.encoder.get(token, self.other_id)

    def _convert_id_to_token(self, index: int) -> str:
        if not 0 <= index < len(self.decoder):
            raise ValueError(f"token id {index} is outside this compact vocabulary of {len(self.decoder)}")
        return self.decoder[index]

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        # Bytes between catch-all tokens decode together: one character can span several tokens.
        pieces, run = [], bytearray()
        for token in tokens:
            if token == OTHER_TEXT:
                pieces += [run.decode("utf-8", errors="replace"), OTHER_TEXT]
                run = bytearray()
            else:
                run += bytes(self.byte_decoder[c] for c in token)
        return "".join(pieces) + run.decode("utf-8", errors="replace")

    def _decode(self, token_ids, skip_special_tokens: bool = False, clean_up_tokenization_spaces=None, **kwargs):
        ids = [int(token_ids)] if isinstance(token_ids, int) else [int(i) for i in token_ids]
        if skip_special_tokens:
            special = set(self.all_special_ids)
            ids = [i for i in ids if i not in special]
        text = self.convert_tokens_to_string([self._convert_id_to_token(i) for i in ids])
        cleanup = self.clean_up_tokenization_spaces if clean_up_tokenization_spaces is None else clean_up_tokenization_spaces
        return self.clean_up_tokenization(text) if cleanup else text

    def save_vocabulary(self, save_directory: str, filename_prefix: str | None = None) -> tuple[str, ...]:
        prefix = f"{filename_prefix}-" if filename_prefix else ""
        saved = []
        for attribute, name in VOCAB_FILES.items():
            source, target = getattr(self, attribute), os.path.join(save_directory, prefix + name)
            if os.path.abspath(source) != os.path.abspath(target):
                shutil.copyfile(source, target)
            saved.append(target)
        return tuple(saved)

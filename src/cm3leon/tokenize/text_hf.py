"""A converted model's own text tokenizer (a Hugging Face ``tokenizer.json``), and the loader
that picks the right tokenizer class for a model directory's ``text_tokenizer/``.

Its ids are the model's ids (the vocabulary has an id table, see :class:`cm3leon.vocab.IdTable`),
so ``Vocab.text_to_ids`` leaves them unchanged. User text never produces a control id:
added/special tokens written literally in the text are encoded as ordinary text
(``encode_special_tokens``), and no BOS/EOS is added (the document layout adds its own).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from tokenizers import Tokenizer

from cm3leon.tokenize.text_bpe import CONFIG_FILE, TOKENIZER_FILE, TextTokenizer, write_tokenizer_dir

KIND = "hf-tokenizers"
FORMAT_VERSION = 1


class HFTextTokenizer:
    """``str <-> list[int]`` with a model's own ``tokenizer.json``; the interface of :class:`TextTokenizer`."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        tokenizer.encode_special_tokens = True
        self._tok = tokenizer

    @classmethod
    def from_file(cls, path: str | Path) -> HFTextTokenizer:
        """Read a ``tokenizer.json`` (clear error if it is missing or not a tokenizers file)."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found; the checkpoint's tokenizer.json is needed")
        try:
            return cls(Tokenizer.from_file(str(path)))
        except Exception as e:  # tokenizers raises a bare Exception on bad JSON
            raise ValueError(f"{path} could not be parsed as a tokenizers file ({e})") from e

    @classmethod
    def load(cls, directory: str | Path) -> HFTextTokenizer:
        """Load a tokenizer written by :meth:`save`."""
        return cls.from_file(Path(directory) / TOKENIZER_FILE)

    def save(self, directory: str | Path) -> None:
        """Write ``tokenizer.json`` and ``tokenizer_config.json`` (kind ``hf-tokenizers``) into ``directory``."""
        write_tokenizer_dir(directory, self._tok, kind=KIND, format_version=FORMAT_VERSION,
                            vocab_size=self.vocab_size)

    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included (the model's vocabulary size at most)."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        """The model's ids of ``text``; no BOS/EOS, special-token names read as plain text."""
        if not isinstance(text, str):
            raise ValueError(f"encode expects a str, got {type(text).__name__}")
        if not text:
            return []
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """:meth:`encode` over many strings."""
        return [self.encode(t) for t in texts]

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ids (special tokens dropped)."""
        ids = [int(i) for i in ids]
        return self._tok.decode(ids, skip_special_tokens=True) if ids else ""


def load_text_tokenizer(directory: str | Path) -> TextTokenizer | HFTextTokenizer:
    """The text tokenizer of a model directory's ``text_tokenizer/``: cm3leon's byte-level BPE, or a
    converted model's own tokenizer (``tokenizer_config.json`` kind ``hf-tokenizers``)."""
    cfg_path = Path(directory) / CONFIG_FILE
    if cfg_path.is_file():
        try:
            kind = json.loads(cfg_path.read_text(encoding="utf-8")).get("kind")
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
            kind = None  # TextTokenizer.load reports the broken file
        if kind == KIND:
            return HFTextTokenizer.load(directory)
    return TextTokenizer.load(directory)

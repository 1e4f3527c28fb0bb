"""Byte-level BPE text tokenizer (paper §2.1: a custom BPE, 56320 ids at paper scale).

The tokenizer maps ``str <-> list[int]`` of *local* BPE ids in ``[0, vocab_size)``. It
has no special tokens at all: ``<eos>``, ``<break>``, ``<mask:i>`` ... live only in the
unified :class:`cm3leon.vocab.Vocab`, so a caption that literally contains the text
``<break>`` is encoded as ordinary bytes and can never forge a control id.

Byte-level means every string round-trips exactly (any Unicode, whitespace runs,
newlines): there is no normalizer, no unknown token and no prefix space.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from cm3leon.config import atomic_write_text

logger = logging.getLogger(__name__)

TOKENIZER_FILE = "tokenizer.json"
CONFIG_FILE = "tokenizer_config.json"
KIND = "cm3leon-byte-level-bpe"
FORMAT_VERSION = 1
N_BYTES = 256




def write_tokenizer_dir(directory: str | Path, tok: Tokenizer, *, kind: str, format_version: int,
                        vocab_size: int) -> None:
    """Write ``tok`` as ``tokenizer.json`` plus a ``tokenizer_config.json`` naming its kind, format
    version and vocabulary size into ``directory`` (atomic per file)."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    atomic_write_text(d / TOKENIZER_FILE, tok.to_str(pretty=False))
    cfg = {"kind": kind, "format_version": format_version, "vocab_size": vocab_size}
    atomic_write_text(d / CONFIG_FILE, json.dumps(cfg, indent=2) + "\n")


class TextTokenizer:
    """Byte-level BPE over HF ``tokenizers``; local ids only, never special tokens."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        _check_is_plain_byte_level_bpe(tokenizer, where="TextTokenizer(...)")
        self._tok = tokenizer

    # ---- construction --------------------------------------------------------------
    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int, *, min_frequency: int = 2) -> TextTokenizer:
        """Train a byte-level BPE with at most ``vocab_size`` ids on ``texts``.

        The 256 byte symbols are always in the vocabulary, so ``vocab_size`` must be at
        least 256; the result may hold fewer ids than asked when the corpus is small
        (read :attr:`vocab_size` for the real size).
        """
        if vocab_size < N_BYTES:
            raise ValueError(
                f"vocab_size={vocab_size} is below the {N_BYTES} byte symbols a byte-level BPE needs; "
                f"pass --vocab-size >= {N_BYTES}"
            )
        if min_frequency < 1:
            raise ValueError(f"min_frequency must be >= 1, got {min_frequency}")
        tok = _empty_byte_level_bpe()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=min_frequency,
            special_tokens=[],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        n = [0]

        def counted() -> Iterable[str]:
            for t in texts:
                if not isinstance(t, str):
                    raise ValueError(f"training texts must be str, got {type(t).__name__}")
                n[0] += 1
                yield t

        tok.train_from_iterator(counted(), trainer=trainer)
        logger.info("trained byte-level BPE on %d texts: %d ids", n[0], tok.get_vocab_size())
        return cls(tok)

    @classmethod
    def load(cls, directory: str | Path) -> TextTokenizer:
        """Load a tokenizer written by :meth:`save` (clear error if missing or corrupt)."""
        d = Path(directory)
        tok_path, cfg_path = d / TOKENIZER_FILE, d / CONFIG_FILE
        for p in (tok_path, cfg_path):
            if not p.is_file():
                raise FileNotFoundError(
                    f"{p} not found: {d} is not a text tokenizer directory "
                    "(train one with `cm3leon tokenizer train-text`)"
                )
        try:
            cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{cfg_path} is not valid JSON ({e}); the file is corrupt, re-save the tokenizer") from e
        if not isinstance(cfg, dict) or cfg.get("kind") != KIND:
            kind = cfg.get("kind") if isinstance(cfg, dict) else None
            raise ValueError(f"{cfg_path} does not describe a {KIND} tokenizer (kind={kind!r})")
        if cfg.get("format_version") != FORMAT_VERSION:
            raise ValueError(
                f"{cfg_path}: unsupported format_version {cfg.get('format_version')!r} (expected {FORMAT_VERSION})"
            )
        try:
            tok = Tokenizer.from_file(str(tok_path))
        except Exception as e:  # tokenizers raises a bare Exception on bad JSON
            raise ValueError(f"{tok_path} could not be parsed ({e}); the file is corrupt or truncated") from e
        _check_is_plain_byte_level_bpe(tok, where=str(tok_path))
        if tok.get_vocab_size() != cfg.get("vocab_size"):
            raise ValueError(
                f"{tok_path} holds {tok.get_vocab_size()} ids but {cfg_path} says {cfg.get('vocab_size')}; "
                "the two files come from different tokenizers"
            )
        return cls(tok)

    def save(self, directory: str | Path) -> None:
        """Write ``tokenizer.json`` and ``tokenizer_config.json`` into ``directory`` (atomic per file)."""
        write_tokenizer_dir(directory, self._tok, kind=KIND, format_version=FORMAT_VERSION,
                            vocab_size=self.vocab_size)

    # ---- use -----------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        """Number of local ids (the unified ``Vocab.text_size``)."""
        return self._tok.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        """Local BPE ids of ``text`` (``""`` gives ``[]``)."""
        if not isinstance(text, str):
            raise ValueError(f"encode expects a str, got {type(text).__name__}")
        if not text:
            return []
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """:meth:`encode` over many strings (parallel inside ``tokenizers``)."""
        texts = list(texts)
        for t in texts:
            if not isinstance(t, str):
                raise ValueError(f"encode_batch expects str items, got {type(t).__name__}")
        return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Sequence[int]) -> str:
        """Text of local ids; exact inverse of :meth:`encode`."""
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(
                f"ids {bad[:5]} are outside [0, {self.vocab_size}); pass local BPE ids "
                "(convert unified ids with Vocab.ids_to_text first)"
            )
        if not ids:
            return ""
        return self._tok.decode(ids, skip_special_tokens=False)

    def token_strings(self, ids: Sequence[int]) -> list[str]:
        """Raw byte-level symbols of ``ids`` (for debugging)."""
        return [self._tok.id_to_token(int(i)) or "?" for i in ids]


def _empty_byte_level_bpe() -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    return tok


def _check_is_plain_byte_level_bpe(tok: Tokenizer, *, where: str) -> None:
    """Refuse tokenizers that could break the no-specials / exact round-trip contract."""
    spec = json.loads(tok.to_str())
    problems = []
    if (spec.get("model") or {}).get("type") != "BPE":
        problems.append(f"model is {(spec.get('model') or {}).get('type')!r}, not BPE")
    if (spec.get("pre_tokenizer") or {}).get("type") != "ByteLevel":
        problems.append("pre-tokenizer is not ByteLevel")
    if spec.get("normalizer") is not None:
        problems.append("it has a normalizer (text would not round-trip exactly)")
    if spec.get("added_tokens"):
        problems.append(f"it has added/special tokens {[t.get('content') for t in spec['added_tokens']][:5]}")
    if spec.get("post_processor") is not None:
        problems.append("it has a post-processor (would insert special tokens)")
    if problems:
        raise ValueError(
            f"{where}: not a plain byte-level BPE: {'; '.join(problems)}. Control tokens belong to "
            "cm3leon.vocab.Vocab; retrain with TextTokenizer.train"
        )


# Keys under which a record's meta holds caption-like text (documented in docs/tokenizers.md).
TEXT_META_KEYS = ("caption", "question", "answer", "instruction", "prompt", "text", "context", "explanation",
                  "options", "rationale")


def record_texts(text: str | None, meta: Mapping[str, Any] | None) -> Iterator[str]:
    """The strings of one record that a text tokenizer should learn from: its ``text`` and
    every string in ``meta`` found under a key containing one of :data:`TEXT_META_KEYS`
    (e.g. ``captions.detailed``, ``vqa[i].question``/``answer``, ``edit.instruction``)."""
    if text:
        yield text
    if meta:
        yield from _meta_strings(meta, matched=False)


def _meta_strings(obj: Any, *, matched: bool) -> Iterator[str]:
    if isinstance(obj, str):
        if matched and obj.strip():
            yield obj
    elif isinstance(obj, Mapping):
        for k, v in obj.items():
            key = str(k).lower()
            yield from _meta_strings(v, matched=matched or any(w in key for w in TEXT_META_KEYS))
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _meta_strings(v, matched=matched)

"""A transformers tokenizer for the unified vocabulary (written by :func:`cm3leon.model.hf.export_hf`).

It is a ``PreTrainedTokenizerFast`` over one ``tokenizers`` JSON whose ids are the model's
ids, so ``AutoTokenizer`` and ``OPTForCausalLM`` from one exported folder agree:

- text: the byte-level BPE of :class:`~cm3leon.tokenize.text_bpe.TextTokenizer` (same
  pre-tokenizer, merges and decoder) with every id shifted by ``vocab.text_offset``, so
  ``tokenizer(s)["input_ids"] == vocab.text_to_ids(text_tokenizer.encode(s))`` for any ``s``
  that holds no token name below. Nothing is added around it (no post-processor):
  ``<eos>`` and ``<break>`` are written in the prompt, e.g. ``"<eos>a red circle<break>"``.
- specials: ``<pad> <eos> <break> <infill> <mask:i>`` at their unified ids, as special
  added tokens. ``<eos>``, ``<break>`` and ``<infill>`` take the spaces next to them
  (``"<eos> a red circle <break>"`` encodes like ``"<eos>a red circle<break>"``, the layout
  the model was trained on); ``<mask:i>`` and ``<pad>`` take none.
- images: ``<img:c>`` is id ``vocab.image_offset + c`` (VQ code ``c``), an added token that
  is not special, so ``decode`` shows image ids by name.
- text ids the BPE does not use (a text range larger than the tokenizer) are named
  ``<text:i>``; they are never produced from text.

Unlike cm3leon's own encoding, where user text can never produce a control id, text given
to this tokenizer that spells a token name (``"<break>"``) becomes that token.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cm3leon.tokenize.text_bpe import TOKENIZER_FILE, TextTokenizer
from cm3leon.vocab import BREAK, EOS, INFILL, PAD, Vocab

if TYPE_CHECKING:
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

SPACE_EATING = (EOS, BREAK, INFILL)  # specials that absorb the whitespace on both sides


def image_token(code: int) -> str:
    """Name of the image id of VQ code ``code`` (``<img:123>``)."""
    return f"<img:{code}>"


def unified_tokenizer(text_tokenizer: TextTokenizer, vocab: Vocab) -> Tokenizer:
    """A ``tokenizers.Tokenizer`` over all ``vocab.size`` unified ids (see the module docstring)."""
    from tokenizers import AddedToken, Tokenizer

    if text_tokenizer.vocab_size > vocab.text_size:
        raise ValueError(f"the text tokenizer has {text_tokenizer.vocab_size} ids but the vocabulary only "
                         f"{vocab.text_size}; they come from different models")
    with tempfile.TemporaryDirectory() as tmp:  # the BPE's JSON through the public save()
        text_tokenizer.save(tmp)
        spec = json.loads((Path(tmp) / TOKENIZER_FILE).read_text(encoding="utf-8"))
    bpe = spec["model"]["vocab"]
    names = {i: vocab.token_name(i) for i in range(vocab.size)}  # specials, <text:i>, <img:c>
    for tok, i in bpe.items():
        names[vocab.text_offset + i] = tok
    # Every id is in the model's vocabulary, so each added token below keeps its unified id.
    spec["model"]["vocab"] = {tok: i for i, tok in names.items()}
    if len(spec["model"]["vocab"]) != vocab.size:
        clash = sorted(set(bpe) & {vocab.token_name(i) for i in range(vocab.size)})
        raise ValueError(f"the text tokenizer has tokens named like cm3leon's own tokens: {clash[:5]}")
    spec["added_tokens"] = []
    tok = Tokenizer.from_str(json.dumps(spec))
    tok.add_special_tokens([
        AddedToken(s, special=True, normalized=False, lstrip=s in SPACE_EATING, rstrip=s in SPACE_EATING)
        for s in vocab.special_tokens
    ])
    tok.add_tokens([AddedToken(image_token(c), special=False, normalized=False) for c in range(vocab.image_size)])
    for i in (0, vocab.size - 1, vocab.image_offset):  # the layout held (a tokenizers change would show here)
        if tok.token_to_id(names[i]) != i:
            raise RuntimeError(f"token {names[i]!r} got id {tok.token_to_id(names[i])}, expected {i}")
    return tok


def to_hf_tokenizer(text_tokenizer: TextTokenizer, vocab: Vocab, *, model_max_length: int) -> PreTrainedTokenizerFast:
    """The transformers tokenizer of the unified vocabulary: ``<eos>`` is bos and eos, ``<pad>``
    pads (on the left, as batched generation needs), ``<mask:0>`` is the mask token."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=unified_tokenizer(text_tokenizer, vocab),
        bos_token=EOS,  # every document starts with <eos> (paper §2.1)
        eos_token=EOS,
        pad_token=PAD,
        mask_token=vocab.special_tokens[vocab.mask_id(0)],
        additional_special_tokens=[s for s in vocab.special_tokens if s not in (EOS, PAD, "<mask:0>")],
        padding_side="left",
        model_input_names=["input_ids", "attention_mask"],  # no token_type_ids (OPT's generate refuses them)
        model_max_length=model_max_length,
        clean_up_tokenization_spaces=False,  # decode gives the text back exactly
    )


def save_hf_tokenizer(tokenizer: PreTrainedTokenizerFast, out_dir: str | Path) -> None:
    """``save_pretrained`` into ``out_dir``, with a ``tokenizer_config.json`` that transformers 4
    and 5 both read (class ``PreTrainedTokenizerFast``; ``additional_special_tokens``)."""
    out = Path(out_dir)
    tokenizer.save_pretrained(str(out))
    path = out / "tokenizer_config.json"
    cfg: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    extra = cfg.pop("extra_special_tokens", None)  # transformers 5's name for the list
    if isinstance(extra, list):
        cfg["additional_special_tokens"] = extra
    elif extra:
        cfg["extra_special_tokens"] = extra
    path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")

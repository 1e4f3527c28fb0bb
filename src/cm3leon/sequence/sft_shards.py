"""SFT examples -> task-tagged shards: each document is the rendered template with its target span."""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterable
from typing import Any

from cm3leon.data.shards import (
    ImageEncoder,
    Shards,
    ShardWriter,
    TextEncoder,
    check_vocab_fits,
    encode_images,
    vocab_for,
)
from cm3leon.sequence.cm3 import check_document
from cm3leon.sequence.sft_templates import ImageSlot, SFTExample, get_task, render_training
from cm3leon.vocab import Vocab


def tokenize_sft(
    examples: Iterable[SFTExample],
    text_tok: TextEncoder,
    image_tok: ImageEncoder,
    out_dir: str | os.PathLike[str],
    *,
    batch_size: int = 64,
    n_masks: int = 8,
    overwrite: bool = False,
    meta: dict[str, Any] | None = None,
    vocab: Vocab | None = None,
) -> Shards:
    """Render examples into shards tagged with their task and target span (VQ in batches).

    ``overwrite`` replaces existing shards at ``out_dir``, never a directory holding other
    files; the writer holds ``out_dir``'s lock while it works (see :class:`ShardWriter`).
    ``vocab`` is a model's own vocabulary (a converted model's id table: documents in its
    causal layout, checked as they are written); default: the tokenizers' contiguous layout."""
    vocab = vocab_for(text_tok, image_tok, n_masks=n_masks) if vocab is None else check_vocab_fits(
        vocab, text_tok, image_tok)
    counts: Counter[str] = Counter()
    writer = ShardWriter(out_dir, vocab, overwrite=overwrite)
    try:
        batch: list[SFTExample] = []
        for ex in examples:
            batch.append(ex)
            if len(batch) == batch_size:
                _write_sft_batch(batch, writer, vocab, text_tok, image_tok, counts)
                batch = []
        _write_sft_batch(batch, writer, vocab, text_tok, image_tok, counts)
        writer.finalize({"kind": "sft", "task_counts": dict(sorted(counts.items())), **(meta or {})})
    except BaseException:
        writer.abort()
        raise
    return Shards(out_dir)


def _write_sft_batch(
    batch: list[SFTExample], writer: ShardWriter, vocab: Vocab, text_tok: TextEncoder, image_tok: ImageEncoder,
    counts: Counter[str],
) -> None:
    slots = [
        (k, s.field)
        for k, ex in enumerate(batch)
        for s in get_task(ex.task).variants[ex.variant]
        if isinstance(s, ImageSlot) and hasattr(ex.fields.get(s.field), "convert")  # PIL images
    ]
    codes = encode_images(image_tok, [batch[k].fields[f] for k, f in slots])
    filled = [dict(ex.fields) for ex in batch]
    for (k, f), c in zip(slots, codes):
        filled[k][f] = c
    for ex, fields in zip(batch, filled):
        r = render_training(ex.task, fields, text_tok, vocab, variant=ex.variant)
        if vocab.ids is not None:  # e.g. a word the model's tokenizer maps to a reserved id
            try:
                check_document(r.ids, vocab)
            except ValueError as e:
                raise ValueError(f"SFT example {counts.total() + 1} ({ex.task}): {e}") from None
        writer.add(r.ids, task=ex.task, target=r.target)
        counts[ex.task] += 1

"""The SFT mixture (App. E.1) and the dataset that trains on it.

"up/down sampling strategy with a threshold of 3/0.3": each task gets weight
``clip(target_share / natural_share, 0.3, 3)`` (default target: equal shares), i.e. rare
tasks are repeated up to 3x and common tasks are kept down to 30%. :class:`SFTDataset`
draws an epoch with those weights from task-tagged shards
(:func:`cm3leon.sequence.sft_shards.tokenize_sft`).
"""

from __future__ import annotations

import logging
import math
import os
import random
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from cm3leon.data.shards import Shards
from cm3leon.sequence.build import open_shards, pack_row, row_rng, to_row, truncate_document
from cm3leon.sequence.cm3 import CM3Config, check_document, cm3_transform
from cm3leon.sequence.sft_templates import infill_form

log = logging.getLogger(__name__)

UP_THRESHOLD = 3.0
DOWN_THRESHOLD = 0.3


def mixture_weights(
    counts: Mapping[str, int],
    target_shares: Mapping[str, float] | None = None,
    *,
    up: float = UP_THRESHOLD,
    down: float = DOWN_THRESHOLD,
    ignore_absent: bool = False,
) -> dict[str, float]:
    """Per-task sampling weight ``clip(target_share / natural_share, down, up)`` (App. E.1).

    ``target_shares`` default to equal shares over the tasks present. A share naming a
    task with no examples is an error, or (``ignore_absent``) logged and dropped, so one
    share table can serve data sets that lack some tasks.
    """
    if not 0 < down <= 1 <= up:
        raise ValueError(f"need 0 < down <= 1 <= up, got down={down}, up={up}")
    present = {t: n for t, n in counts.items() if n > 0}
    if not present:
        return {}
    shares = dict(target_shares) if target_shares is not None else {t: 1.0 for t in present}
    unknown = set(shares) - set(present)
    if unknown and not ignore_absent:
        raise ValueError(f"target shares name tasks with no examples: {sorted(unknown)}")
    if unknown:
        log.warning("target shares for tasks with no examples are ignored: %s", sorted(unknown))
    total_share = sum(shares.get(t, 0.0) for t in present)
    if total_share <= 0:
        raise ValueError("target shares must be positive for at least one present task")
    total = sum(present.values())
    return {
        t: min(up, max(down, (shares.get(t, 0.0) / total_share) / (n / total)))
        for t, n in present.items()
    }


def mixture_table(counts: Mapping[str, int], weights: Mapping[str, float]) -> str:
    """A plain-text table: task, examples, natural %, weight, sampled examples, sampled %."""
    eff = {t: _effective(counts[t], weights.get(t, 0.0)) for t in counts}
    n, m = sum(counts.values()) or 1, sum(eff.values()) or 1
    lines = [f"{'task':<20}{'examples':>10}{'natural%':>10}{'weight':>8}{'sampled':>10}{'sampled%':>10}"]
    for t in sorted(counts):
        lines.append(
            f"{t:<20}{counts[t]:>10}{100 * counts[t] / n:>10.1f}{weights.get(t, 0.0):>8.2f}"
            f"{eff[t]:>10}{100 * eff[t] / m:>10.1f}"
        )
    lines.append(f"{'total':<20}{sum(counts.values()):>10}{100.0:>10.1f}{'':>8}{sum(eff.values()):>10}{100.0:>10.1f}")
    return "\n".join(lines)


def _effective(n: int, w: float) -> int:
    return max(1, int(math.floor(n * w + 0.5))) if n and w > 0 else 0


class SFTDataset(torch.utils.data.Dataset):
    """Map-style SFT rows over task-tagged shards, mixture-balanced.

    The shards come from :func:`~cm3leon.sequence.sft_shards.tokenize_sft`. An epoch holds
    ``round(n_t * w_t)`` examples of task ``t`` (repeats for up-sampled tasks, a seeded
    subset for down-sampled ones), shuffled. Each example is trained with the CM3
    objective: with probability ``target_infill_prob`` its target is the masked span
    (exactly the inference layout of :func:`~cm3leon.sequence.sft_templates.render_prompt`),
    otherwise random CM3 spans are drawn as in pretraining. A vocabulary without CM3
    sentinels (a converted model's id table) trains every document causally, as rendered
    (its target last, the loss on every id as for the CM3 rows). Rows are packed like
    :class:`~cm3leon.sequence.build.PretrainDataset`'s;
    row ``i`` is a deterministic function of ``(seed, i)``.
    """

    def __init__(
        self,
        shards: Shards | str | os.PathLike[str],
        *,
        seq_len: int,
        seed: int = 0,
        cm3: CM3Config | dict[str, Any] | None = None,
        target_infill_prob: float = 0.5,
        target_shares: Mapping[str, float] | None = None,
        weights: Mapping[str, float] | None = None,
        up: float = UP_THRESHOLD,
        down: float = DOWN_THRESHOLD,
        ignore_absent_shares: bool = False,
        pack: bool = True,
        max_fill_tries: int = 4,
    ) -> None:
        self.shards = open_shards(shards)
        self.vocab = self.shards.vocab
        self.cm3 = CM3Config(**cm3) if isinstance(cm3, dict) else (cm3 or CM3Config())
        if not 0.0 <= target_infill_prob <= 1.0:
            raise ValueError(f"target_infill_prob must be in [0, 1], got {target_infill_prob}")
        if seq_len < self.vocab.image_seq_len + 1:
            raise ValueError(f"seq_len={seq_len} cannot hold one image ({self.vocab.image_seq_len} tokens + <eos>)")
        n = len(self.shards)
        if n == 0:
            raise ValueError(f"{self.shards.path} holds no documents")
        self.seq_len, self.seed, self.pack, self.max_fill_tries = seq_len, seed, pack, max_fill_tries
        self.target_infill_prob = target_infill_prob
        tags = np.asarray(self.shards.task_ids) if self.shards.task_ids is not None else np.full(n, -1)
        by_task = {name: np.flatnonzero(tags == k) for k, name in enumerate(self.shards.task_names)}
        by_task["untagged"] = np.flatnonzero(tags < 0)
        by_task = {t: v for t, v in by_task.items() if len(v)}
        self.counts = {t: len(v) for t, v in by_task.items()}
        self.weights = dict(weights) if weights is not None else mixture_weights(
            self.counts, target_shares, up=up, down=down, ignore_absent=ignore_absent_shares)
        rng = np.random.default_rng(seed)
        parts = []
        for t in sorted(by_task):
            docs = by_task[t][rng.permutation(len(by_task[t]))]
            k = _effective(len(docs), self.weights.get(t, 0.0))
            parts.append(np.resize(docs, k))  # cycles through the permutation for up-sampled tasks
        order = np.concatenate(parts) if parts else np.zeros(0, np.int64)
        if len(order) == 0:
            raise ValueError("the SFT mixture is empty: every task has weight 0")
        self.order = order[rng.permutation(len(order))]
        self.n_too_long = int(np.sum(self.shards.lengths > seq_len))
        log.info("SFT mixture (%d rows per epoch):\n%s", len(self.order), self.table())
        if self.vocab.ids is not None:
            log.info("the vocabulary has no CM3 sentinels: SFT documents train causally "
                     "(target_infill_prob and the cm3 options are unused)")
        if self.n_too_long:
            log.warning("%d SFT documents are longer than seq_len=%d and will be cut", self.n_too_long, seq_len)

    def table(self) -> str:
        """The mixture as a printable table."""
        return mixture_table(self.counts, self.weights)

    def __len__(self) -> int:
        return len(self.order)

    def example(self, doc: int, rng: random.Random, budget: int, first: bool) -> list[int] | None:
        """CM3 form of one SFT document within ``budget`` (None if it cannot fit whole); a vocabulary
        without sentinels (an id table) trains the document as it is, causally."""
        ids = self.shards[doc]
        target = self.shards.target(doc)
        if self.vocab.ids is not None:
            check_document(ids, self.vocab)
            out = list(ids)
        elif target is not None and rng.random() < self.target_infill_prob:
            out = infill_form(ids, target, self.vocab)
        else:
            c = self.cm3
            out = cm3_transform(ids, self.vocab, rng, poisson_lambda=c.poisson_lambda, max_spans=c.max_spans,
                                whole_segment_prob=c.whole_segment_prob, mask_images=c.mask_images,
                                segment_choice=c.segment_choice)
        if len(out) <= budget:
            return out
        return truncate_document(ids, budget, self.vocab) if first else None

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"row {i} out of range for {n} rows")
        i %= n
        rng = row_rng(self.seed, i)
        window = pack_row(
            int(self.order[i]), self.example, lambda r: int(self.order[r.randrange(n)]), rng,
            self.seq_len, pack=self.pack, max_fill_tries=self.max_fill_tries,
        )
        return to_row(window, self.seq_len, self.vocab)

"""One id space for text and images (paper §2.1).

Layout (contiguous, disjoint ranges):

    [0, n_special)                         specials: <pad> <eos> <break> <infill> <mask:0> ... <mask:K-1>
    [text_offset, text_offset+text_size)   text ids  (BPE id t  -> text_offset + t)
    [image_offset, image_offset+image_size) image ids (VQ code c -> image_offset + c)

Every other module (CM3 masking, sequence building, the sampler's modality masks, the
loss) reads ids through a :class:`Vocab`; nobody hard-codes an offset.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from enum import Enum
from typing import Any

import torch

PAD, EOS, BREAK, INFILL = "<pad>", "<eos>", "<break>", "<infill>"


class Kind(str, Enum):
    """What an id stands for."""

    SPECIAL = "special"
    TEXT = "text"
    IMAGE = "image"


@dataclass(frozen=True)
class Vocab:
    """The unified vocabulary: specials, then text ids, then image ids.

    ``image_seq_len`` is L, the number of image tokens per image (e.g. 1024 at paper
    scale, 64 for 32 px images with f=4): an image segment always holds exactly L ids.
    """

    text_size: int
    image_size: int
    image_seq_len: int
    n_masks: int = 8

    def __post_init__(self) -> None:
        for name in ("text_size", "image_size", "image_seq_len", "n_masks"):
            if getattr(self, name) <= 0:
                raise ValueError(f"Vocab.{name} must be positive, got {getattr(self, name)}")

    # ---- presets -------------------------------------------------------------------
    @classmethod
    def paper(cls) -> Vocab:
        """Paper scale: 56320 text + 8192 image codes, 1024 tokens per 256 px image."""
        return cls(text_size=56320, image_size=8192, image_seq_len=1024)

    # ---- special ids ---------------------------------------------------------------
    @property
    def pad_id(self) -> int:
        return 0

    @property
    def eos_id(self) -> int:
        return 1

    @property
    def break_id(self) -> int:
        return 2

    @property
    def infill_id(self) -> int:
        return 3

    def mask_id(self, i: int = 0) -> int:
        """Id of sentinel ``<mask:i>``; ``<mask:0>`` is the paper's ``<mask>``."""
        if not 0 <= i < self.n_masks:
            raise ValueError(f"mask index {i} out of range [0, {self.n_masks}); raise Vocab.n_masks")
        return 4 + i

    @property
    def n_special(self) -> int:
        return 4 + self.n_masks

    @property
    def special_tokens(self) -> list[str]:
        return [PAD, EOS, BREAK, INFILL] + [f"<mask:{i}>" for i in range(self.n_masks)]

    # ---- ranges --------------------------------------------------------------------
    @property
    def text_offset(self) -> int:
        return self.n_special

    @property
    def image_offset(self) -> int:
        return self.n_special + self.text_size

    @property
    def size(self) -> int:
        """Total number of ids (the model's embedding / LM-head size)."""
        return self.n_special + self.text_size + self.image_size

    def kind(self, i: int) -> Kind:
        """Tell what an id stands for; raises on ids outside the vocabulary."""
        if 0 <= i < self.n_special:
            return Kind.SPECIAL
        if self.text_offset <= i < self.image_offset:
            return Kind.TEXT
        if self.image_offset <= i < self.size:
            return Kind.IMAGE
        raise ValueError(f"id {i} is outside the vocabulary [0, {self.size})")

    def is_mask(self, i: int) -> bool:
        return 4 <= i < 4 + self.n_masks

    def mask_index(self, i: int) -> int:
        """Inverse of :meth:`mask_id`."""
        if not self.is_mask(i):
            raise ValueError(f"id {i} is not a <mask:i> sentinel")
        return i - 4

    def token_name(self, i: int) -> str:
        """Readable name of an id (for debugging and error messages)."""
        k = self.kind(i)
        if k is Kind.SPECIAL:
            return self.special_tokens[i]
        if k is Kind.TEXT:
            return f"<text:{i - self.text_offset}>"
        return f"<img:{i - self.image_offset}>"

    # ---- conversions ---------------------------------------------------------------
    def text_to_ids(self, bpe_ids: list[int] | torch.Tensor) -> Any:
        """Map tokenizer-local BPE ids into the unified id space."""
        if isinstance(bpe_ids, torch.Tensor):
            return bpe_ids + self.text_offset
        return [t + self.text_offset for t in bpe_ids]

    def ids_to_text(self, ids: list[int] | torch.Tensor) -> Any:
        """Map unified text ids back to tokenizer-local BPE ids."""
        if isinstance(ids, torch.Tensor):
            return ids - self.text_offset
        return [t - self.text_offset for t in ids]

    def codes_to_ids(self, codes: list[int] | torch.Tensor) -> Any:
        """Map VQ codebook indices into the unified id space."""
        if isinstance(codes, torch.Tensor):
            return codes + self.image_offset
        return [c + self.image_offset for c in codes]

    def ids_to_codes(self, ids: list[int] | torch.Tensor) -> Any:
        """Map unified image ids back to VQ codebook indices."""
        if isinstance(ids, torch.Tensor):
            return ids - self.image_offset
        return [c - self.image_offset for c in ids]

    # ---- masks for the sampler -----------------------------------------------------
    def image_mask(self, device: torch.device | str | None = None) -> torch.Tensor:
        """Bool [size]: True on image ids only."""
        m = torch.zeros(self.size, dtype=torch.bool, device=device)
        m[self.image_offset :] = True
        return m

    def text_mask(self, device: torch.device | str | None = None, *, with_terminators: bool = True) -> torch.Tensor:
        """Bool [size]: True on text ids, plus ``<eos>``/``<break>`` if ``with_terminators``."""
        m = torch.zeros(self.size, dtype=torch.bool, device=device)
        m[self.text_offset : self.image_offset] = True
        if with_terminators:
            m[self.eos_id] = True
            m[self.break_id] = True
        return m

    def kinds_tensor(self, ids: torch.Tensor) -> torch.Tensor:
        """Per-id kind code for a tensor: 0 special, 1 text, 2 image."""
        out = torch.zeros_like(ids)
        out[(ids >= self.text_offset) & (ids < self.image_offset)] = 1
        out[ids >= self.image_offset] = 2
        return out

    # ---- segments ------------------------------------------------------------------
    def split_segments(self, ids: list[int]) -> list[tuple[Kind, list[int]]]:
        """Split ids at ``<eos>``/``<break>`` into runs; each run is (kind, ids).

        The separators themselves come back as single-id SPECIAL runs so the split is
        lossless: concatenating the runs gives ``ids`` back. A run's kind is TEXT if it
        holds any text id, IMAGE if it holds only image ids, SPECIAL otherwise.
        """
        runs: list[tuple[Kind, list[int]]] = []
        cur: list[int] = []

        def flush() -> None:
            if cur:
                kinds = {self.kind(i) for i in cur}
                k = Kind.TEXT if Kind.TEXT in kinds else Kind.IMAGE if kinds == {Kind.IMAGE} else Kind.SPECIAL
                runs.append((k, list(cur)))
                cur.clear()

        for i in ids:
            if i in (self.eos_id, self.break_id):
                flush()
                runs.append((Kind.SPECIAL, [i]))
            else:
                self.kind(i)  # validates range
                cur.append(i)
        flush()
        return runs

    # ---- (de)serialization ---------------------------------------------------------
    def to_dict(self) -> dict[str, int]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Vocab:
        known = {"text_size", "image_size", "image_seq_len", "n_masks"}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown vocab fields {sorted(unknown)}; expected {sorted(known)}")
        return cls(**d)

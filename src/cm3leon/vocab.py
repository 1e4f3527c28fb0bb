"""One id space for text and images (paper §2.1).

Layout (contiguous, disjoint ranges):

    [0, n_special)                         specials: <pad> <eos> <break> <infill> <mask:0> ... <mask:K-1>
    [text_offset, text_offset+text_size)   text ids  (BPE id t  -> text_offset + t)
    [image_offset, image_offset+image_size) image ids (VQ code c -> image_offset + c)

Every other module (CM3 masking, sequence building, the sampler's modality masks, the
loss) reads ids through a :class:`Vocab`; nobody hard-codes an offset.

A model converted from elsewhere (Chameleon) keeps its own ids: ``Vocab(ids=IdTable(...))``
names every control id and the id of each VQ code explicitly (image ids need not be
contiguous, nor in code order), text ids are the model's ids (the tokenizer's own), and
an image segment is wrapped in the model's begin/end-of-image markers::

    <s> text <begin-image> IMAGE <end-image> text ... </s>

Without ``ids`` (every cm3leon-trained model) nothing changes.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from enum import Enum
from functools import cached_property
from typing import Any

import torch

PAD, EOS, BREAK, INFILL = "<pad>", "<eos>", "<break>", "<infill>"


class Kind(str, Enum):
    """What an id stands for."""

    SPECIAL = "special"
    TEXT = "text"
    IMAGE = "image"


@dataclass(frozen=True)
class IdTable:
    """The explicit id layout of a converted model (``transformers`` Chameleon and its descendants).

    ``doc_start`` opens a document (the role ``<eos>`` plays in cm3leon's layout; Chameleon's
    ``<s>``); ``end_text`` ends generated text (``</s>``); ``begin_image`` / ``end_image`` wrap
    every image segment (``<racm3:break>`` / ``<eoss>``); ``image[c]`` is the id of VQ code c;
    ``masks`` are CM3 sentinel ids (none: the model has no infilling). ``reserved`` ids are
    neither text nor image and are never generated (Chameleon: every other ``<...>`` entry).
    """

    size: int
    doc_start: int
    end_text: int
    pad: int
    begin_image: int
    end_image: int
    image: tuple[int, ...]
    masks: tuple[int, ...] = ()
    reserved: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        for name in ("image", "masks", "reserved"):
            object.__setattr__(self, name, tuple(int(i) for i in getattr(self, name)))
        controls = self.controls
        if len(set(controls)) != len(controls):
            raise ValueError(f"IdTable: control ids {controls} are not distinct")
        if not self.image or len(set(self.image)) != len(self.image):
            raise ValueError("IdTable.image must list one distinct id per VQ code")
        if set(self.reserved) & (set(controls) | set(self.image)):
            raise ValueError("IdTable.reserved must not hold control or image ids")
        out = [i for i in (*controls, *self.image, *self.reserved) if not 0 <= i < self.size]
        if out:
            raise ValueError(f"IdTable: ids {out[:5]} are outside the vocabulary [0, {self.size})")
        if set(controls) & set(self.image):
            raise ValueError(f"IdTable: ids {sorted(set(controls) & set(self.image))[:5]} are both control and image")

    @property
    def controls(self) -> tuple[int, ...]:
        """Every control id: document start, end of text, pad, image markers, sentinels."""
        return (self.doc_start, self.end_text, self.pad, self.begin_image, self.end_image, *self.masks)


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
    ids: IdTable | None = None  # an explicit layout (converted models); None: the contiguous one above

    def __post_init__(self) -> None:
        if isinstance(self.ids, dict):
            object.__setattr__(self, "ids", IdTable(**self.ids))
        if self.ids is not None:
            t = self.ids
            n_text = t.size - len(t.controls) - len(t.image) - len(t.reserved)
            if (self.text_size, self.image_size, self.n_masks) != (n_text, len(t.image), len(t.masks)):
                raise ValueError(
                    f"Vocab with an id table: text_size, image_size, n_masks must be {n_text}, {len(t.image)}, "
                    f"{len(t.masks)} (got {self.text_size}, {self.image_size}, {self.n_masks}); use Vocab.from_table"
                )
            if self.image_seq_len <= 0:
                raise ValueError(f"Vocab.image_seq_len must be positive, got {self.image_seq_len}")
            return
        for name in ("text_size", "image_size", "image_seq_len", "n_masks"):
            if getattr(self, name) <= 0:
                raise ValueError(f"Vocab.{name} must be positive, got {getattr(self, name)}")

    @classmethod
    def from_table(cls, table: IdTable, image_seq_len: int) -> Vocab:
        """The vocabulary of a converted model: its id table, L image tokens per image."""
        n_text = table.size - len(table.controls) - len(table.image) - len(table.reserved)
        return cls(text_size=n_text, image_size=len(table.image), image_seq_len=image_seq_len,
                   n_masks=len(table.masks), ids=table)

    # ---- presets -------------------------------------------------------------------
    @classmethod
    def paper(cls) -> Vocab:
        """Paper scale: 56320 text + 8192 image codes, 1024 tokens per 256 px image."""
        return cls(text_size=56320, image_size=8192, image_seq_len=1024)

    # ---- special ids ---------------------------------------------------------------
    @property
    def pad_id(self) -> int:
        return 0 if self.ids is None else self.ids.pad

    @property
    def eos_id(self) -> int:
        """The id that starts every document (cm3leon: ``<eos>``; an id table: its ``doc_start``)."""
        return 1 if self.ids is None else self.ids.doc_start

    @property
    def break_id(self) -> int:
        """The id right before an image (cm3leon: ``<break>``, also between text segments;
        an id table: its ``begin_image``)."""
        return 2 if self.ids is None else self.ids.begin_image

    @property
    def end_image_id(self) -> int | None:
        """The id that closes an image segment (an id table's ``end_image``); None in cm3leon's layout,
        where the next ``<break>`` / ``<eos>`` ends it."""
        return None if self.ids is None else self.ids.end_image

    @property
    def stop_ids(self) -> tuple[int, ...]:
        """Ids that end generated text: ``<eos>``, ``<break>`` (an id table: end of text, document
        start, begin-image)."""
        if self.ids is None:
            return (self.eos_id, self.break_id)
        return (self.ids.end_text, self.ids.doc_start, self.ids.begin_image)

    @property
    def infill_id(self) -> int:
        if self.ids is not None:
            raise ValueError("this model's vocabulary has no <infill> id (it was not trained with CM3 infilling)")
        return 3

    def mask_id(self, i: int = 0) -> int:
        """Id of sentinel ``<mask:i>``; ``<mask:0>`` is the paper's ``<mask>``."""
        if self.ids is not None and not self.ids.masks:
            raise ValueError("this model's vocabulary has no <mask> sentinels (it was not trained with CM3 infilling)")
        if not 0 <= i < self.n_masks:
            raise ValueError(f"mask index {i} out of range [0, {self.n_masks}); raise Vocab.n_masks")
        return 4 + i if self.ids is None else self.ids.masks[i]

    def segment_prefix(self, kind: Kind, *, first: bool) -> list[int]:
        """Ids written before a segment of ``kind``: ``<break>`` between segments (cm3leon), the
        begin-image marker before an image (an id table)."""
        if self.ids is None:
            return [] if first else [self.break_id]
        return [self.ids.begin_image] if kind is Kind.IMAGE else []

    def segment_suffix(self, kind: Kind) -> list[int]:
        """Ids written after a segment of ``kind``: the end-image marker after an image (an id table only)."""
        return [self.ids.end_image] if self.ids is not None and kind is Kind.IMAGE else []

    @property
    def n_special(self) -> int:
        return 4 + self.n_masks

    @property
    def special_tokens(self) -> list[str]:
        return [PAD, EOS, BREAK, INFILL] + [f"<mask:{i}>" for i in range(self.n_masks)]

    # ---- ranges --------------------------------------------------------------------
    @property
    def text_offset(self) -> int:
        """Unified id of text id 0 (an id table: 0, text ids are the model's own)."""
        return self.n_special if self.ids is None else 0

    @property
    def image_offset(self) -> int:
        if self.ids is not None:
            raise ValueError("this vocabulary's image ids are an explicit table, not one range; "
                             "use codes_to_ids / image_mask")
        return self.n_special + self.text_size

    @property
    def size(self) -> int:
        """Total number of ids (the model's embedding / LM-head size)."""
        if self.ids is not None:
            return self.ids.size
        return self.n_special + self.text_size + self.image_size

    @cached_property
    def _kinds(self) -> torch.Tensor:
        """Long[size] kind code of every id of an id table (0 special, 1 text, 2 image)."""
        assert self.ids is not None
        k = torch.ones(self.ids.size, dtype=torch.long)
        k[list(self.ids.controls) + list(self.ids.reserved)] = 0
        k[list(self.ids.image)] = 2
        return k

    @cached_property
    def _code_of_id(self) -> torch.Tensor:
        """Long[size]: the VQ code of each image id of an id table, -1 elsewhere."""
        assert self.ids is not None
        c = torch.full((self.ids.size,), -1, dtype=torch.long)
        c[list(self.ids.image)] = torch.arange(len(self.ids.image))
        return c

    def kind(self, i: int) -> Kind:
        """Tell what an id stands for; raises on ids outside the vocabulary."""
        if self.ids is not None:
            if not 0 <= i < self.size:
                raise ValueError(f"id {i} is outside the vocabulary [0, {self.size})")
            return (Kind.SPECIAL, Kind.TEXT, Kind.IMAGE)[int(self._kinds[i])]
        if 0 <= i < self.n_special:
            return Kind.SPECIAL
        if self.text_offset <= i < self.image_offset:
            return Kind.TEXT
        if self.image_offset <= i < self.size:
            return Kind.IMAGE
        raise ValueError(f"id {i} is outside the vocabulary [0, {self.size})")

    def is_mask(self, i: int) -> bool:
        if self.ids is not None:
            return i in self.ids.masks
        return 4 <= i < 4 + self.n_masks

    def mask_index(self, i: int) -> int:
        """Inverse of :meth:`mask_id`."""
        if not self.is_mask(i):
            raise ValueError(f"id {i} is not a <mask:i> sentinel")
        return i - 4 if self.ids is None else self.ids.masks.index(i)

    def token_name(self, i: int) -> str:
        """Readable name of an id (for debugging and error messages)."""
        k = self.kind(i)
        if self.ids is not None:
            t = self.ids
            names = {t.doc_start: "<doc>", t.end_text: "<end-text>", t.pad: "<pad>", t.begin_image: "<begin-image>",
                     t.end_image: "<end-image>", **{m: f"<mask:{j}>" for j, m in enumerate(t.masks)}}
            if k is Kind.SPECIAL:
                return names.get(i, f"<reserved:{i}>")
            return f"<text:{i}>" if k is Kind.TEXT else f"<img:{int(self._code_of_id[i])}>"
        if k is Kind.SPECIAL:
            return self.special_tokens[i]
        if k is Kind.TEXT:
            return f"<text:{i - self.text_offset}>"
        return f"<img:{i - self.image_offset}>"

    # ---- conversions ---------------------------------------------------------------
    def text_to_ids(self, bpe_ids: list[int] | torch.Tensor) -> Any:
        """Map tokenizer-local BPE ids into the unified id space (an id table: unchanged)."""
        if self.ids is not None:
            return bpe_ids.clone() if isinstance(bpe_ids, torch.Tensor) else list(bpe_ids)
        if isinstance(bpe_ids, torch.Tensor):
            return bpe_ids + self.text_offset
        return [t + self.text_offset for t in bpe_ids]

    def ids_to_text(self, ids: list[int] | torch.Tensor) -> Any:
        """Map unified text ids back to tokenizer-local BPE ids (an id table: unchanged)."""
        if self.ids is not None:
            return ids.clone() if isinstance(ids, torch.Tensor) else list(ids)
        if isinstance(ids, torch.Tensor):
            return ids - self.text_offset
        return [t - self.text_offset for t in ids]

    def codes_to_ids(self, codes: list[int] | torch.Tensor) -> Any:
        """Map VQ codebook indices into the unified id space."""
        if self.ids is not None:
            table = torch.tensor(self.ids.image, dtype=torch.long)
            if isinstance(codes, torch.Tensor):
                return table.to(codes.device)[codes]
            return [self.ids.image[c] for c in codes]
        if isinstance(codes, torch.Tensor):
            return codes + self.image_offset
        return [c + self.image_offset for c in codes]

    def ids_to_codes(self, ids: list[int] | torch.Tensor) -> Any:
        """Map unified image ids back to VQ codebook indices (an id table: -1 for non-image ids)."""
        if self.ids is not None:
            if isinstance(ids, torch.Tensor):
                return self._code_of_id.to(ids.device)[ids]
            return self._code_of_id[list(ids)].tolist() if len(ids) else []
        if isinstance(ids, torch.Tensor):
            return ids - self.image_offset
        return [c - self.image_offset for c in ids]

    # ---- masks for the sampler -----------------------------------------------------
    def image_mask(self, device: torch.device | str | None = None) -> torch.Tensor:
        """Bool [size]: True on image ids only."""
        if self.ids is not None:
            return (self._kinds == 2).to(device)
        m = torch.zeros(self.size, dtype=torch.bool, device=device)
        m[self.image_offset :] = True
        return m

    def text_mask(self, device: torch.device | str | None = None, *, with_terminators: bool = True) -> torch.Tensor:
        """Bool [size]: True on text ids, plus the ids that end text (:attr:`stop_ids`) if ``with_terminators``."""
        if self.ids is not None:
            m = self._kinds == 1
            if with_terminators:
                m[list(self.stop_ids)] = True
            return m.to(device)
        m = torch.zeros(self.size, dtype=torch.bool, device=device)
        m[self.text_offset : self.image_offset] = True
        if with_terminators:
            m[self.eos_id] = True
            m[self.break_id] = True
        return m

    def kinds_tensor(self, ids: torch.Tensor) -> torch.Tensor:
        """Per-id kind code for a tensor: 0 special, 1 text, 2 image."""
        if self.ids is not None:
            return self._kinds.to(ids.device)[ids]
        out = torch.zeros_like(ids)
        out[(ids >= self.text_offset) & (ids < self.image_offset)] = 1
        out[ids >= self.image_offset] = 2
        return out

    # ---- segments ------------------------------------------------------------------
    def split_segments(self, ids: list[int]) -> list[tuple[Kind, list[int]]]:
        """Split ids at ``<eos>``/``<break>`` (an id table: at its document start, end of text and image
        markers) into runs; each run is (kind, ids).

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

        seps = {self.eos_id, self.break_id} if self.ids is None else set(self.stop_ids) | {self.ids.end_image}
        for i in ids:
            if i in seps:
                flush()
                runs.append((Kind.SPECIAL, [i]))
            else:
                self.kind(i)  # validates range
                cur.append(i)
        flush()
        return runs

    # ---- (de)serialization ---------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        if self.ids is None:
            del d["ids"]  # the contiguous layout's vocab.json names its four sizes only
        else:
            d["ids"] = {**d["ids"], **{k: list(getattr(self.ids, k)) for k in ("image", "masks", "reserved")}}
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Vocab:
        known = {"text_size", "image_size", "image_seq_len", "n_masks", "ids"}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown vocab fields {sorted(unknown)}; expected {sorted(known)}")
        return cls(**d)

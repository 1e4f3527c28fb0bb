"""The record every data source yields, whatever the on-disk format."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from PIL import Image


@dataclass
class DocRecord:
    """One raw document: an image and/or a caption, plus free-form metadata.

    ``image`` is an RGB PIL image (sources convert RGBA/L/CMYK/16-bit to RGB) or None for
    text-only documents; ``text`` is the caption or None for image-only documents.
    ``meta`` carries task annotations (Shapes: objects, boxes, VQA, edits, ...).
    """

    id: str
    text: str | None = None
    image: Image.Image | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def is_multimodal(self) -> bool:
        return self.text is not None and self.image is not None

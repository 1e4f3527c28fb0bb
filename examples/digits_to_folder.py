"""Write scikit-learn's bundled handwritten digits as an image-caption data set.

    python examples/digits_to_folder.py data/digits                       # folder: PNGs + captions.jsonl
    python examples/digits_to_folder.py data/digits-coco --layout coco    # captions.json + images/
    python examples/digits_to_folder.py data/digits-wds --layout webdataset
    python examples/digits_to_folder.py data/digits-pq --layout parquet

The 1,797 8x8 digits of ``sklearn.datasets.load_digits`` (no download: the file ships with
scikit-learn) are drawn dark on white and upscaled to ``--size`` px (bicubic), each captioned
"a handwritten digit N". ``--n`` keeps the first N. Every layout is one that
``cm3leon quickstart --data PATH`` reads (docs/own-data.md): the folder and parquet layouts
as the folder, COCO as ``PATH/captions.json``, WebDataset as ``PATH/digits-{000000..K}.tar``.
"""

from __future__ import annotations

import argparse
import io
import json
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

LAYOUTS = ("folder", "coco", "webdataset", "parquet")


def digit_images(size: int = 32, n: int | None = None) -> list[tuple[Image.Image, str, int]]:
    """``(image, caption, label)`` for the first ``n`` digits (all 1,797 when None), ``size`` px RGB."""
    from sklearn.datasets import load_digits

    d = load_digits()
    out = []
    for img, label in list(zip(d.images, d.target))[:n]:
        gray = (255 - np.asarray(img) * (255 / 16)).clip(0, 255).astype(np.uint8)  # 0..16 ink -> dark on white
        im = Image.fromarray(gray, "L").resize((size, size), Image.BICUBIC).convert("RGB")
        out.append((im, f"a handwritten digit {int(label)}", int(label)))
    return out


def _png(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def write_layout(out: Path, items: list[tuple[Image.Image, str, int]], layout: str = "folder",
                 *, per_shard: int = 1000) -> Path:
    """Write ``items`` under ``out`` in ``layout``; returns the path to pass as ``--data``."""
    out.mkdir(parents=True, exist_ok=True)
    names = [f"{i:05d}" for i in range(len(items))]
    if layout == "folder":
        lines = []
        for name, (im, cap, _) in zip(names, items):
            im.save(out / f"{name}.png")
            lines.append(json.dumps({"file": f"{name}.png", "text": cap}))
        (out / "captions.jsonl").write_text("\n".join(lines) + "\n")
        return out
    if layout == "coco":
        (out / "images").mkdir(exist_ok=True)
        images, anns = [], []
        for i, (name, (im, cap, _)) in enumerate(zip(names, items)):
            im.save(out / "images" / f"{name}.png")
            images.append({"id": i, "file_name": f"{name}.png"})
            anns.append({"id": i, "image_id": i, "caption": cap})
        (out / "captions.json").write_text(json.dumps({"images": images, "annotations": anns}))
        return out / "captions.json"
    if layout == "webdataset":
        for s in range(0, len(items), per_shard):
            with tarfile.open(out / f"digits-{s // per_shard:06d}.tar", "w") as tar:
                for name, (im, cap, _) in zip(names[s:s + per_shard], items[s:s + per_shard]):
                    for ext, data in (("png", _png(im)), ("txt", cap.encode())):
                        info = tarfile.TarInfo(f"{name}.{ext}")
                        info.size = len(data)
                        tar.addfile(info, io.BytesIO(data))
        return out
    if layout == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        for s in range(0, len(items), per_shard):
            chunk = items[s:s + per_shard]
            pq.write_table(pa.table({"key": names[s:s + per_shard], "image": [_png(im) for im, _, _ in chunk],
                                     "text": [c for _, c, _ in chunk]}), out / f"digits-{s // per_shard:06d}.parquet")
        return out
    raise ValueError(f"unknown layout {layout!r}; choose one of {LAYOUTS}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--layout", default="folder", choices=LAYOUTS)
    ap.add_argument("--size", type=int, default=32, help="image side in px (default 32)")
    ap.add_argument("--n", type=int, default=None, help="keep the first N digits (default: all 1,797)")
    args = ap.parse_args()
    path = write_layout(args.out, digit_images(args.size, args.n), args.layout)
    print(f"wrote {args.n or 1797} digits ({args.layout}); pass --data {path}")


if __name__ == "__main__":
    main()

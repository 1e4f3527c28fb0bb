"""An independent judge of a digits run: does a generated "a handwritten digit N" show an N?

    python examples/digits_judge.py runs/digits

A support-vector classifier (scikit-learn's ``SVC``, the classic digits setup) is trained on
the real 8x8 digits that the run did not hold out, then applied to the run's best generated
image of every held-out caption (``RUN/eval/t2i.jsonl``), each downsampled to 8x8 the way
the data was upscaled (dark on white -> 0..16 ink). Prints one JSON line: the share of
generated images classified as their captioned digit, the same share on the real held-out
images after the same 32 px round trip (the judge's ceiling), and chance (0.1).
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import numpy as np
from PIL import Image


def to_8x8(image: Image.Image) -> np.ndarray:
    """A dark-on-white image as the 64 ink values (0..16) of scikit-learn's digits."""
    gray = np.asarray(image.convert("L").resize((8, 8), Image.BOX), np.float64)
    return (255.0 - gray) * (16.0 / 255.0)


def _label(caption: str) -> int:
    m = re.search(r"digit (\d)\b", caption)
    if m is None:
        raise ValueError(f"caption {caption!r} names no digit")
    return int(m.group(1))


def _index(record_id: str) -> int:
    """The position in ``load_digits()`` of a record written by digits_to_folder.py (``00042.png``)."""
    return int(re.findall(r"\d+", record_id)[-1])


def judge(run: Path) -> dict[str, float | int]:
    """Accuracy of the classifier on ``run``'s generated and real held-out images."""
    from sklearn.datasets import load_digits
    from sklearn.svm import SVC

    from cm3leon.data.dataset import Dataset

    rows = [json.loads(x) for x in (run / "eval" / "t2i.jsonl").read_text().splitlines() if x.strip()]
    real = {r.id: r.image for r in Dataset(run / "data" / "val")}
    held = {_index(i) for i in real}
    d = load_digits()
    keep = np.array([i not in held for i in range(len(d.target))])
    clf = SVC(gamma=0.001).fit(d.data[keep], d.target[keep])
    labels = np.array([_label(r["prompt"]) for r in rows])
    gen = np.stack([to_8x8(Image.open(run / "eval" / r["file"])).ravel() for r in rows])
    real_x = np.stack([to_8x8(real[r["id"]]).ravel() for r in rows])
    return {"generated_accuracy": float((clf.predict(gen) == labels).mean()),
            "real_heldout_accuracy": float((clf.predict(real_x) == labels).mean()),
            "chance": 0.1, "images": len(rows), "classifier_train_digits": int(keep.sum())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run", type=Path, help="the --out folder of `cm3leon quickstart --data`")
    print(json.dumps(judge(ap.parse_args().run)))


if __name__ == "__main__":
    main()

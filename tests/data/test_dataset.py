"""The cm3leon dataset format (data/dataset.py): round trip, random access, parts, columns,
atomic writes and errors that name the fix."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cm3leon.data.dataset import Dataset, DatasetWriter, load_manifest, read_dataset, write_dataset
from cm3leon.data.records import DocRecord


def _toy_records(n: int) -> list[DocRecord]:
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        img = Image.fromarray(rng.integers(0, 255, (8, 6, 3), dtype=np.uint8))
        extra = {"mask": Image.fromarray(rng.integers(0, 255, (4, 4, 3), dtype=np.uint8))} if i % 2 else {}
        out.append(DocRecord(id=f"r{i}", text=None if i == 3 else f"caption {i}",
                             image=None if i == 5 else img, meta={"k": i, "images": extra}))
    return out


def test_dataset_round_trip_random_access_and_parts(tmp_path: Path):
    recs = _toy_records(23)
    out = write_dataset(tmp_path / "ds", recs, source="toy", seed=1, rows_per_part=10)
    mf = load_manifest(out)
    assert mf["format"] == "cm3leon-dataset" and mf["version"] == 1 and mf["n"] == 23
    assert [p["n"] for p in mf["parts"]] == [10, 10, 3]
    assert mf["columns"] == ["id", "image", "text", "meta", "mask"]
    assert mf["task_counts"] == {"caption": 21, "image": 1, "text": 1}
    ds = Dataset(out)
    assert len(ds) == 23
    streamed = list(read_dataset(out))
    for i in [0, 22, 7, 3, 5, 11, -1]:
        rec, ref = ds[i], recs[i]
        assert rec.id == ref.id == streamed[i].id
        assert rec.text == ref.text
        assert (rec.image is None) == (ref.image is None)
        if ref.image is not None:
            assert rec.image.tobytes() == ref.image.tobytes() and rec.image.mode == "RGB"
        assert rec.meta["k"] == ref.meta["k"]
        if ref.meta["images"]:
            assert rec.meta["images"]["mask"].tobytes() == ref.meta["images"]["mask"].tobytes()
        else:
            assert "images" not in rec.meta
    with pytest.raises(IndexError):
        ds[23]
    only_text = Dataset(out, columns=["text"])
    assert only_text[4].image is None and only_text[4].text == "caption 4" and only_text[4].meta == {}
    with pytest.raises(ValueError, match="unknown columns"):
        Dataset(out, columns=["nope"])


def test_dataset_write_is_atomic_and_refuses_to_clobber(tmp_path: Path):
    out = tmp_path / "ds"

    def boom():
        yield from _toy_records(3)
        raise RuntimeError("crash mid-write")

    with pytest.raises(RuntimeError):
        write_dataset(out, boom(), rows_per_part=2)
    assert not out.exists() and list(tmp_path.iterdir()) == []  # nothing half-written left
    write_dataset(out, _toy_records(3))
    with pytest.raises(ValueError, match="already exists"):
        write_dataset(out, _toy_records(2))
    write_dataset(out, _toy_records(2), overwrite=True)
    assert len(Dataset(out)) == 2 and sorted(p.name for p in tmp_path.iterdir()) == ["ds"]


def test_dataset_errors_name_the_fix(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Dataset(tmp_path / "missing")
    (tmp_path / "d").mkdir()
    with pytest.raises(FileNotFoundError, match="manifest.json"):
        Dataset(tmp_path / "d")
    out = write_dataset(tmp_path / "ok", _toy_records(2))
    mf = json.loads((out / "manifest.json").read_text())
    mf["version"] = 99
    (out / "manifest.json").write_text(json.dumps(mf))
    with pytest.raises(ValueError, match="version"):
        Dataset(out)
    with pytest.raises(ValueError, match="non-empty string"):
        with DatasetWriter(tmp_path / "x") as w:
            w.add(DocRecord(id=""))

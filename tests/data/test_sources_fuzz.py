"""Random JSON values in caption fields, COCO fields and parquet columns: the readers never
raise anything but a clear ValueError for an unusable data set, and the good rows plus the
skipped ones add up to the input."""

from __future__ import annotations

import io
import json
import tarfile
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from cm3leon.data.sources import NoGoodRowsError, Source, open_source


def _png(value: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (3, 2), (value, 0, 0)).save(buf, format="PNG")
    return buf.getvalue()


PNG = _png(9)
HF_IMAGE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
FUZZ = settings(max_examples=30, deadline=None, database=None)

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=6,
)
captions = st.one_of(st.text(max_size=8), json_values)


def _read(make: Callable[[], Source]) -> tuple[Source, list[Any]]:
    """Open and read a source; a ValueError is allowed only where no row is usable."""
    src = make()
    try:
        recs = list(src)
    except NoGoodRowsError as e:
        assert src.stats.ok == 0 and "\n" not in str(e)
        assert ("no usable rows" if src.stats.n_skipped else "no rows to read") in str(e)
        recs = []
    assert src.stats.ok == len(recs)
    return src, recs


def _good_text(value: Any) -> bool:
    return isinstance(value, str) and bool(value.strip())


@FUZZ
@given(texts=st.lists(captions, min_size=1, max_size=5),
       junk=st.lists(st.binary(max_size=12) | json_values.filter(lambda v: not isinstance(v, dict)), max_size=3))
def test_fuzz_captions_jsonl(texts: list[Any], junk: list[Any]):
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        lines = []
        for i, text in enumerate(texts):
            (d / f"{i}.png").write_bytes(PNG)
            lines.append(json.dumps({"file": f"{i}.png", "text": text}).encode())
        # junk lines: raw bytes behind a '#' (never JSON, never blank) and JSON values that are not objects
        lines += [b"#" + j.replace(b"\n", b" ") if isinstance(j, bytes) else json.dumps(j).encode() for j in junk]
        (d / "captions.jsonl").write_bytes(b"\n".join(lines) + b"\n")
        src, recs = _read(lambda: open_source(d))
        assert sorted(r.id for r in recs) == sorted(f"{i}.png" for i, t in enumerate(texts) if _good_text(t))
        assert src.stats.skipped["bad_caption_line"] == len(junk)
        assert src.stats.skipped["bad_caption_type"] == sum(t is not None and not isinstance(t, str) for t in texts)
        assert src.stats.ok + src.stats.n_skipped == len(texts) + len(junk)


@FUZZ
@given(jsons=st.lists(st.one_of(json_values, st.dictionaries(st.sampled_from(["caption", "text", "url"]), captions)),
                      min_size=1, max_size=5))
def test_fuzz_webdataset_json_captions(jsons: list[Any]):
    with tempfile.TemporaryDirectory() as tmp:
        shard = Path(tmp) / "s.tar"
        with tarfile.open(shard, "w") as tf:
            for i, j in enumerate(jsons):
                for name, data in ((f"{i:03d}.png", PNG), (f"{i:03d}.json", json.dumps(j).encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tf.addfile(info, io.BytesIO(data))
        src, recs = _read(lambda: open_source(shard))
        assert all(isinstance(r.text, str) and r.text.strip() for r in recs)
        assert src.stats.ok + src.stats.n_skipped == len(jsons)


ids = st.one_of(st.integers(0, 4), json_values)


@FUZZ
@given(images=st.one_of(json_values, st.lists(st.one_of(
           st.fixed_dictionaries({"id": ids, "file_name": st.one_of(
               st.sampled_from(["0.png", "1.png", "missing.png", "../0.png", "/etc/passwd", ""]), json_values)}),
           json_values), max_size=5)),
       annotations=st.lists(st.one_of(st.fixed_dictionaries({"image_id": ids, "caption": captions}), json_values),
                            max_size=6))
def test_fuzz_coco_fields(images: Any, annotations: list[Any]):
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "imgs").mkdir()
        for name in ("0.png", "1.png"):
            (root / "imgs" / name).write_bytes(PNG)
        ann = root / "ann.json"
        ann.write_text(json.dumps({"images": images, "annotations": annotations}))
        if not isinstance(images, list):
            try:
                open_source(ann, images=root / "imgs")
            except ValueError as e:
                assert "'images' must be a list" in str(e)
                return
            raise AssertionError("a COCO file whose images is not a list was accepted")
        src, recs = _read(lambda: open_source(ann, images=root / "imgs"))

        def usable_id(v: Any) -> bool:
            return isinstance(v, (int, str)) and not isinstance(v, bool)

        known = {im["id"] for im in images if isinstance(im, dict) and usable_id(im.get("id"))}
        unusable = sum(not isinstance(a, dict) or not usable_id(a.get("image_id"))
                       or not isinstance(a.get("caption"), str) or a["image_id"] not in known for a in annotations)
        assert src.stats.ok + src.stats.n_skipped == len(images) + unusable
        assert all(r.meta["file"] in ("0.png", "1.png") for r in recs)


def _column(n: int) -> st.SearchStrategy[pa.Array]:
    """A parquet column of ``n`` values of one random type (nulls allowed)."""
    def opt(s: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
        return st.none() | s
    kinds = [
        st.lists(opt(st.integers(-5, 5)), min_size=n, max_size=n).map(lambda v: pa.array(v, pa.int64())),
        st.lists(opt(st.floats(allow_nan=False)), min_size=n, max_size=n).map(lambda v: pa.array(v, pa.float64())),
        st.lists(opt(st.booleans()), min_size=n, max_size=n).map(lambda v: pa.array(v, pa.bool_())),
        st.lists(opt(st.text(max_size=6)), min_size=n, max_size=n).map(lambda v: pa.array(v, pa.string())),
        st.lists(opt(st.sampled_from([PNG, b"", b"junk", "é".encode(), b"\xff"]) | st.binary(max_size=6)),
                 min_size=n, max_size=n).map(lambda v: pa.array(v, pa.binary())),
        st.lists(opt(st.lists(opt(st.text(max_size=4)), max_size=2)), min_size=n, max_size=n)
        .map(lambda v: pa.array(v, pa.list_(pa.string()))),
        st.lists(opt(st.fixed_dictionaries({
            "bytes": opt(st.sampled_from([PNG, b"junk"])),
            "path": opt(st.sampled_from(["side.png", "nope.png", "../side.png", "/etc/passwd", ""])),
        })), min_size=n, max_size=n).map(lambda v: pa.array(v, HF_IMAGE)),
    ]
    return st.one_of(kinds)


@st.composite
def parquet_tables(draw: st.DrawFn) -> tuple[pa.Table, bool, int]:
    n = draw(st.integers(1, 5))
    table = pa.table({"image": draw(_column(n)), "text": draw(_column(n))})
    return table, draw(st.booleans()), draw(st.integers(0, 3))


@FUZZ
@given(case=parquet_tables())
def test_fuzz_parquet_columns(case: tuple[pa.Table, bool, int]):
    table, add_corrupt, missing_rows = case
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp) / "pq"
        d.mkdir()
        (d / "side.png").write_bytes(PNG)
        pq.write_table(table, d / "b-random.parquet")
        if add_corrupt:
            (d / "a-corrupt.parquet").write_bytes(b"not parquet")
        if missing_rows:
            pq.write_table(pa.table({"other": list(range(missing_rows))}), d / "c-other.parquet")
        src, recs = _read(lambda: open_source(d))
        assert src.stats.skipped["corrupt_file"] == int(add_corrupt)
        assert src.stats.skipped["missing_columns"] == missing_rows
        assert src.stats.ok + src.stats.n_skipped == table.num_rows + int(add_corrupt) + missing_rows
        assert all(isinstance(r.text, str) and r.text.strip() and r.image is not None for r in recs)

"""Bad rows never stop a run: each is counted under a named reason with its place, the good
rows are all read, names outside the data root are refused, and the counts reach the manifest."""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from cm3leon.data.dataset import Dataset, write_dataset
from cm3leon.data.records import DocRecord
from cm3leon.data.sources import NoGoodRowsError, open_source
from helpers import write_tar


def _png(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (6, 8, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _images(d: Path, names: list[str]) -> None:
    d.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(names):
        (d / name).write_bytes(_png(i))


def _read(src) -> tuple[list[DocRecord], dict[str, int], str]:
    recs = list(src)
    return recs, dict(src.stats.skipped), src.stats.summary()


# ------------------------------------------------------------------ 1. wrong field types


def test_1_jsonl_caption_that_is_not_a_string(tmp_path: Path):
    d = tmp_path / "imgs"
    _images(d, ["a.png", "b.png", "c.png", "d.png"])
    lines = [{"file": "a.png", "text": "one"}, {"file": "b.png", "text": 123}, {"file": "c.png", "text": "three"},
             {"file": "d.png", "text": {"en": "four"}}]
    (d / "captions.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    recs, skipped, summary = _read(open_source(d))
    assert [r.text for r in recs] == ["one", "three"]
    assert skipped == {"bad_caption_type": 2}
    assert "bad_caption_type: 2 [captions.jsonl lines 2, 4]" in summary


def test_1_webdataset_json_caption_that_is_not_a_string(tmp_path: Path):
    shard = tmp_path / "shard-00000.tar"
    write_tar(shard, [("000.png", _png(0)), ("000.json", b'{"caption": 42}'),
                 ("001.png", _png(1)), ("001.json", b'{"caption": "one"}'),
                 ("002.png", _png(2)), ("002.json", b'{"caption": [1, 2], "text": "two"}'),
                 ("003.png", _png(3)), ("003.json", b'{"caption": null, "text": false}')])
    recs, skipped, summary = _read(open_source(shard))
    assert [r.text for r in recs] == ["one", "two"]  # a string under "text" still serves
    assert skipped == {"bad_caption_type": 2}
    assert "bad_caption_type: 2 [shard-00000.tar keys 000, 003]" in summary


def test_1_parquet_columns_of_the_wrong_type(tmp_path: Path):
    d = tmp_path / "pq"
    d.mkdir()
    good = [_png(0), _png(1)]
    pq.write_table(pa.table({"image": good, "text": pa.array([1, 2], pa.int64())}), d / "a-int-text.parquet")
    pq.write_table(pa.table({"image": good, "text": [{"en": "x"}, {"en": "y"}]}), d / "b-struct-text.parquet")
    pq.write_table(pa.table({"image": ["a.png", "b.png"], "text": ["s", "t"]}), d / "c-string-image.parquet")
    pq.write_table(pa.table({"picture": good, "words": ["u", "v"]}), d / "d-no-columns.parquet")
    pq.write_table(pa.table({"image": good, "text": ["good one", "good two"]}), d / "e-good.parquet")
    pq.write_table(pa.table({"image": good, "text": [["first", "second"], []]}), d / "f-lists.parquet")
    src = open_source(d)
    recs, skipped, summary = _read(src)
    assert [r.text for r in recs] == ["good one", "good two", "first"]
    assert skipped == {"bad_caption_type": 4, "bad_image_type": 2, "missing_columns": 2, "missing_caption": 1}
    assert "bad_image_type: 2 [c-string-image.parquet rows 0, 1]" in summary
    assert "missing_columns: 2 [d-no-columns.parquet]" in summary
    assert src.stats.ok + src.stats.n_skipped == 12


def test_1_coco_fields_of_the_wrong_type(tmp_path: Path):
    root = tmp_path / "coco"
    _images(root / "images", ["0.png", "1.png", "2.png"])
    ann = root / "captions.json"
    ann.write_text(json.dumps({"images": None, "annotations": []}))
    with pytest.raises(ValueError, match="'images' must be a list, got null"):
        open_source(ann, images=root / "images")
    ann.write_text(json.dumps({
        "images": [{"id": 0, "file_name": "0.png"}, {"id": 1, "file_name": 17}, {"id": [2], "file_name": "2.png"},
                   {"id": 3, "file_name": "1.png"}, "not an object"],
        "annotations": [{"image_id": 0, "caption": "zero"}, {"image_id": 1, "caption": "one"},
                        {"image_id": [2], "caption": "two"}, {"image_id": 3, "caption": 33},
                        {"image_id": 3, "caption": "three"}, {"image_id": 99, "caption": "nobody"}],
    }))
    recs, skipped, summary = _read(open_source(ann))  # the folder is guessed past the bad file_name
    assert [(r.id, r.text) for r in recs] == [("0", "zero"), ("3", "three")]
    assert skipped == {"bad_annotation": 4, "bad_caption_type": 1, "orphan_caption": 1}
    assert "bad_annotation: 4 [captions.json annotation #2; captions.json images 1, #2; ...]" in summary
    assert "bad_caption_type: 1 [captions.json annotation #3]" in summary


# ------------------------------------------------------------------ 2. a bad line or file, the rest read


def test_2_bad_line_or_file_is_counted_and_the_rest_is_read(tmp_path: Path, caplog: pytest.LogCaptureFixture):
    d = tmp_path / "imgs"
    _images(d, ["a.png", "b.png", "c.png", "d.png"])
    (d / "captions.jsonl").write_bytes(
        b'{"file": "a.png", "text": "caf\xc3\xa9 ok"}\n'
        b'{"file": "b.png", "text": "caf\xe9 latin-1"}\n'  # not UTF-8
        b'{"file": "c.png", "text": "three"}\n'
        b'{"file": "d.png", "text": "lone \\ud800"}\n'  # valid JSON, but no UTF-8 for it
    )
    recs, skipped, summary = _read(open_source(d))
    assert [r.text for r in recs] == ["café ok", "three"]
    assert skipped == {"bad_caption_line": 1, "missing_caption": 1, "bad_caption_encoding": 1}  # b.png lost its line
    assert "bad_caption_line: 1 [captions.jsonl line 2]" in summary

    side = tmp_path / "side"
    _images(side, ["a.png", "b.png"])
    (side / "a.txt").write_bytes("\ufeffsidecar".encode())
    (side / "b.txt").write_bytes(b"caf\xe9")
    recs, skipped, summary = _read(open_source(side))
    assert [r.text for r in recs] == ["sidecar"] and skipped == {"bad_caption_encoding": 1}
    assert "bad_caption_encoding: 1 [b.txt]" in summary

    pqd = tmp_path / "pq"
    pqd.mkdir()
    (pqd / "0-corrupt.parquet").write_bytes(b"PAR1 this is not parquet at all")
    pq.write_table(pa.table({"image": [_png(0), _png(1)], "text": ["x", "y"]}), pqd / "1-good.parquet")
    shard = tmp_path / "s.tar"
    write_tar(shard, [("0.png", _png(0)), ("0.txt", b"good"), ("1.png", _png(1)), ("1.txt", b"\xff\xfe bad")])
    with caplog.at_level(logging.WARNING, logger="cm3leon.data.sources"):
        recs, skipped, summary = _read(open_source(pqd))
        assert [r.text for r in recs] == ["x", "y"] and skipped == {"corrupt_file": 1}
        assert "corrupt_file: 1 [0-corrupt.parquet]" in summary
        assert any("0-corrupt.parquet" in r.getMessage() and "magic bytes" in r.getMessage() for r in caplog.records)
        recs, skipped, _ = _read(open_source(shard))
        assert [r.text for r in recs] == ["good"] and skipped == {"bad_caption_encoding": 1}


# ------------------------------------------------------------------ 3. names outside the data root


def test_3_paths_outside_the_root_are_refused(tmp_path: Path):
    secret = tmp_path / "secret.png"  # a valid image: if it were opened, it would be read as a good row
    secret.write_bytes(_png(7))
    root = tmp_path / "data"
    _images(root / "images", ["ok.png"])
    ann = root / "ann.json"
    ann.write_text(json.dumps({
        "images": [{"id": 1, "file_name": "ok.png"}, {"id": 2, "file_name": str(secret)},
                   {"id": 3, "file_name": "../../secret.png"}, {"id": 4, "file_name": "sub/../../../secret.png"}],
        "annotations": [{"image_id": i, "caption": f"c{i}"} for i in range(1, 5)],
    }))
    recs, skipped, summary = _read(open_source(ann, images=root / "images"))
    assert [r.id for r in recs] == ["1"] and skipped == {"path_outside_root": 3}
    assert "path_outside_root: 3 [ann.json images 2, 3, 4]" in summary

    hf_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    hf = pa.array([{"bytes": None, "path": "ok.png"}, {"bytes": None, "path": str(secret)},
                   {"bytes": None, "path": "../secret.png"}], hf_type)
    pq.write_table(pa.table({"image": hf, "text": ["a", "b", "c"]}), root / "images" / "hf.parquet")
    recs, skipped, summary = _read(open_source(root / "images" / "hf.parquet"))
    assert [r.text for r in recs] == ["a"] and skipped == {"path_outside_root": 2}
    assert "hf.parquet rows 1, 2" in summary

    (root / "images" / "captions.jsonl").write_text(
        json.dumps({"file": "ok.png", "text": "fine"}) + "\n"
        + json.dumps({"file": "../secret.png", "text": "x"}) + "\n"
    )
    recs, skipped, summary = _read(open_source(root / "images", kind="folder"))
    assert [r.text for r in recs] == ["fine"] and skipped == {"path_outside_root": 1}
    assert "captions.jsonl line 2" in summary


# ------------------------------------------------------------------ 4. the summary, the log and the manifest


def test_4_summary_names_the_places_and_the_manifest_keeps_the_counts(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
):
    from cm3leon.cli import main

    d = tmp_path / "imgs"
    _images(d, [f"{i}.png" for i in range(6)])
    (d / "junk.png").write_bytes(b"not an image")
    lines = [json.dumps({"file": f"{i}.png", "text": f"t{i}" if i % 2 else i}) for i in range(6)]
    lines += [json.dumps({"file": "junk.png", "text": "j"}), json.dumps({"file": "/etc/passwd", "text": "p"})]
    (d / "captions.jsonl").write_text("\n".join(lines) + "\n")
    out = tmp_path / "converted"
    with caplog.at_level(logging.WARNING):
        assert main(["data", "convert", str(d), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    expected = ("3 ok, 5 skipped (bad_caption_type: 3 [captions.jsonl lines 1, 3, 5], corrupt_image: 1 [junk.png], "
                "path_outside_root: 1 [captions.jsonl line 8])")
    assert expected in printed
    warned = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert any(expected in m for m in warned)  # without -v
    ds = Dataset(out)
    assert len(ds) == 3 and ds.manifest["skipped"] == {"bad_caption_type": 3, "corrupt_image": 1,
                                                       "path_outside_root": 1}
    assert main(["data", "inspect", str(d)]) == 0
    assert expected in capsys.readouterr().out


def test_no_usable_row_is_one_line_with_the_reason_and_the_fix(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    from cm3leon.cli import main

    d = tmp_path / "imgs"
    _images(d, ["a.png", "b.png", "c.png"])
    (d / "captions.jsonl").write_text("\n".join(json.dumps({"file": n, "text": 5}) for n in ("a.png", "b.png")) + "\n")
    with pytest.raises(NoGoodRowsError) as e:
        list(open_source(d))
    msg = str(e.value)
    assert "\n" not in msg and "no usable rows: all 3 skipped, most often bad_caption_type (2 at captions.jsonl" in msg
    assert "fix: captions must be strings" in msg
    out = tmp_path / "never"
    assert main(["data", "convert", str(d), "--out", str(out)]) == 1
    assert "error: " in capsys.readouterr().err and not out.exists()  # nothing half-written
    assert main(["data", "inspect", str(d)]) == 1
    captured = capsys.readouterr()
    assert "bad rows: 0 ok, 3 skipped" in captured.out and "most often bad_caption_type" in captured.err


def test_dataset_dir_bad_meta_and_unreadable_part_count_each_row(tmp_path: Path):
    recs = [DocRecord(id=f"r{i}", text=f"t{i}") for i in range(5)]
    out = write_dataset(tmp_path / "ds", recs, rows_per_part=3)
    part0 = out / "part-00000.parquet"
    table = pq.read_table(part0)
    metas = table.column("meta").to_pylist()
    metas[1] = "{not json"
    pq.write_table(table.set_column(table.schema.get_field_index("meta"), "meta", pa.array(metas)), part0)
    (out / "part-00001.parquet").write_bytes(b"garbage")
    src = open_source(out)
    got, skipped, summary = _read(src)
    assert [r.id for r in got] == ["r0", "r2"]
    assert skipped == {"bad_meta": 1, "corrupt_file": 2}  # the manifest says part 1 held 2 rows
    assert "bad_meta: 1 [part-00000.parquet row 1]" in summary and "part-00001.parquet rows 0, 1" in summary

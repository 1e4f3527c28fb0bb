"""Readers for users' data: small fixtures of every layout, with bad rows, read back."""

from __future__ import annotations

import io
import json
import struct
import tarfile
import zlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from cm3leon.data.dataset import decode_image, to_rgb, write_dataset
from cm3leon.data.records import DocRecord
from cm3leon.data.sources import (
    CocoSource,
    FolderSource,
    ParquetSource,
    WebDatasetSource,
    detect_kind,
    open_source,
)
from helpers import write_tar


def _img(seed: int, size: tuple[int, int] = (12, 10)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))


def _bytes(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _png_header_only(w: int, h: int) -> bytes:
    """A PNG that declares w x h pixels but carries (almost) no data: a decompression-bomb stand-in."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 10)) + chunk(b"IEND", b"")


GOOD = [_img(i) for i in range(4)]
TRUNCATED = _bytes(_img(9, (64, 64)))[:200]
CORRUPT = b"this is not an image"
BOMB = _png_header_only(20000, 20000)  # 400 MP > the 64 MP limit


def _same(a: Image.Image, b: Image.Image) -> bool:
    return a.mode == b.mode == "RGB" and a.tobytes() == b.tobytes()


# ------------------------------------------------------------------ image decoding


def test_modes_are_converted_to_rgb():
    rgba = Image.new("RGBA", (2, 1))
    rgba.putpixel((0, 0), (255, 0, 0, 0))  # fully transparent red -> white
    rgba.putpixel((1, 0), (0, 0, 255, 128))  # half blue over white
    out, mode = decode_image(_bytes(rgba))
    assert mode == "RGBA" and out.getpixel((0, 0)) == (255, 255, 255)
    r, g, b = out.getpixel((1, 0))
    assert abs(r - 127) <= 1 and abs(g - 127) <= 1 and b == 255
    la = Image.new("LA", (1, 1), (10, 0))
    assert decode_image(_bytes(la))[0].getpixel((0, 0)) == (255, 255, 255)
    i16 = Image.fromarray(np.array([[0, 65535, 32768]], dtype=np.uint16))
    out, mode = decode_image(_bytes(i16))
    assert mode.startswith("I") and [out.getpixel((x, 0))[0] for x in range(3)] == [0, 255, 128]
    pal = Image.new("P", (1, 1), 0)
    pal.putpalette([0, 200, 0] + [0] * 765)
    assert decode_image(_bytes(pal))[0].getpixel((0, 0)) == (0, 200, 0)
    cmyk = Image.new("CMYK", (1, 1), (0, 255, 255, 0))
    out, mode = decode_image(_bytes(cmyk, "JPEG", quality=100))
    assert mode == "CMYK" and out.mode == "RGB" and out.getpixel((0, 0))[0] > 200
    gray = Image.new("L", (1, 1), 77)
    assert to_rgb(gray)[0].getpixel((0, 0)) == (77, 77, 77)


@pytest.mark.parametrize("data,reason", [(TRUNCATED, "truncated_image"), (CORRUPT, "corrupt_image"),
                                         (BOMB, "too_large"), (b"", "corrupt_image")])
def test_bad_images_raise_with_a_reason(data, reason):
    from cm3leon.data.dataset import BadImageError

    with pytest.raises(BadImageError) as e:
        decode_image(data)
    assert e.value.reason == reason


def test_pixel_limit_is_configurable():
    from cm3leon.data.dataset import BadImageError

    with pytest.raises(BadImageError, match="exceeds"):
        decode_image(_bytes(_img(0, (20, 20))), max_pixels=399)
    assert decode_image(_bytes(_img(0, (20, 20))), max_pixels=400)[0].size == (20, 20)


# ------------------------------------------------------------------ folder


def _folder(tmp: Path, sidecar: bool) -> Path:
    d = tmp / ("side" if sidecar else "jsonl")
    (d / "sub").mkdir(parents=True)
    files = {"a.png": _bytes(GOOD[0]), "b.jpg": _bytes(GOOD[1], "PNG"), "sub/c.png": _bytes(GOOD[2]),
             "trunc.png": TRUNCATED, "bad.png": CORRUPT, "nocap.png": _bytes(GOOD[3]),
             "rgba.png": _bytes(Image.new("RGBA", (3, 3), (0, 0, 0, 0)))}
    caps = {"a.png": "first", "b.jpg": "second", "sub/c.png": "third", "trunc.png": "t", "bad.png": "x",
            "rgba.png": "clear"}
    for name, data in files.items():
        (d / name).write_bytes(data)
    if sidecar:
        for name, text in caps.items():
            (d / name).with_suffix(".txt").write_text(text + "\n")
    else:
        lines = [json.dumps({"file": k, "text": v}) for k, v in caps.items()] + ["{not json"]
        (d / "captions.jsonl").write_text("\n".join(lines) + "\n")
    return d


@pytest.mark.parametrize("sidecar", [False, True])
def test_folder_source(tmp_path: Path, sidecar: bool):
    src = open_source(_folder(tmp_path, sidecar))
    assert isinstance(src, FolderSource)
    recs = {r.id: r for r in src}
    assert sorted(recs) == ["a.png", "b.jpg", "rgba.png", "sub/c.png"]
    assert recs["sub/c.png"].text == "third" and _same(recs["sub/c.png"].image, GOOD[2])
    assert recs["rgba.png"].image.getpixel((1, 1)) == (255, 255, 255)
    expected = {"truncated_image": 1, "corrupt_image": 1, "missing_caption": 1}
    if not sidecar:
        expected["bad_caption_line"] = 1
    assert dict(src.stats.skipped) == expected
    assert src.stats.ok == 4 and src.stats.converted["RGBA"] == 1
    assert "4 ok, " in src.stats.summary()


# ------------------------------------------------------------------ COCO


def test_coco_source(tmp_path: Path):
    root = tmp_path / "coco"
    (root / "annotations").mkdir(parents=True)
    (root / "val2017").mkdir()
    for i, img in enumerate(GOOD[:3]):
        (root / "val2017" / f"{i:012d}.jpg").write_bytes(_bytes(img))
    (root / "val2017" / "000000000003.jpg").write_bytes(TRUNCATED)
    ann = {
        "images": [{"id": i, "file_name": f"{i:012d}.jpg"} for i in range(5)],
        "annotations": [{"image_id": 0, "caption": " A cat. "}, {"image_id": 0, "caption": "A feline."},
                        {"image_id": 1, "caption": "A dog."}, {"image_id": 3, "caption": "broken"},
                        {"image_id": 4, "caption": "file is missing"}],
    }
    path = root / "annotations" / "captions_val2017.json"
    path.write_text(json.dumps(ann))
    src = open_source(path)
    assert isinstance(src, CocoSource) and src.images == root / "val2017"  # image folder guessed
    recs = list(src)
    assert [r.id for r in recs] == ["0", "1"]
    assert recs[0].text == "A cat." and recs[0].meta["captions"] == ["A cat.", "A feline."]
    assert _same(recs[1].image, GOOD[1])
    assert dict(src.stats.skipped) == {"missing_caption": 1, "truncated_image": 1, "missing_image": 1}
    # explicit folder, and the error when it cannot be guessed
    other = tmp_path / "elsewhere.json"
    other.write_text(json.dumps(ann))
    with pytest.raises(FileNotFoundError, match="--images"):
        open_source(other)
    assert len(list(open_source(other, images=root / "val2017"))) == 2
    bad = tmp_path / "notcoco.json"
    bad.write_text(json.dumps({"foo": 1}))
    with pytest.raises(ValueError, match="not a COCO captions file"):
        open_source(bad)


# ------------------------------------------------------------------ WebDataset


def test_webdataset_source(tmp_path: Path):
    d = tmp_path / "wds"
    d.mkdir()
    write_tar(d / "shard-00000.tar", [
        ("000.jpg", _bytes(GOOD[0])), ("000.txt", b"zero"), ("000.json", b'{"url": "u0"}'),
        ("001.jpg", _bytes(GOOD[1])), ("001.json", b'{"caption": "one from json"}'),
        ("002.jpg", CORRUPT), ("002.txt", b"bad image"),
        ("003.jpg", _bytes(GOOD[2])),  # no caption at all
    ])
    write_tar(d / "shard-00001.tar", [("004.png", _bytes(GOOD[3])), ("004.txt", b"four"),
                                 ("005.png", _bytes(GOOD[0], "PNG")), ("005.txt", b"five")])
    full = (d / "shard-00001.tar").read_bytes()
    with tarfile.open(d / "shard-00001.tar") as tf:
        cut = tf.getmember("005.png").offset_data + 10
    (d / "shard-00002.tar").write_bytes(full[:cut])  # truncated inside the second sample
    src = open_source(d)
    assert isinstance(src, WebDatasetSource) and len(src.shards) == 3
    recs = list(src)
    assert [r.text for r in recs] == ["zero", "one from json", "four", "five", "four"]
    assert recs[0].meta["json"] == {"url": "u0"} and _same(recs[2].image, GOOD[3])
    assert dict(src.stats.skipped) == {"corrupt_image": 1, "missing_caption": 1, "corrupt_shard": 1}
    # single shard and brace notation
    assert len(list(open_source(d / "shard-00001.tar"))) == 2
    assert len(list(WebDatasetSource(str(d / "shard-{00000..00001}.tar")))) == 4
    with pytest.raises(FileNotFoundError):
        WebDatasetSource(str(d / "shard-{00005..00006}.tar"))


# ------------------------------------------------------------------ parquet


def test_parquet_source_binary_and_hf_struct(tmp_path: Path):
    d = tmp_path / "pq"
    d.mkdir()
    pq.write_table(pa.table({"jpg": [_bytes(GOOD[0]), TRUNCATED, None, _bytes(GOOD[1])],
                             "caption": ["a", "b", "c", None], "key": ["k0", "k1", "k2", "k3"]}),
                   d / "0.parquet")
    (tmp_path / "side.png").write_bytes(_bytes(GOOD[3]))  # HF paths are relative to the file
    struct_col = pa.array([{"bytes": _bytes(GOOD[2]), "path": None}, {"bytes": None, "path": "side.png"},
                           {"bytes": None, "path": "missing.png"}],
                          pa.struct([("bytes", pa.binary()), ("path", pa.string())]))
    pq.write_table(pa.table({"image": struct_col, "text": ["x", "y", "z"]}), tmp_path / "hf.parquet")

    src = open_source(d / "0.parquet", id_column="key")
    assert isinstance(src, ParquetSource) and (src.image_column, src.text_column) == ("jpg", "caption")
    recs = list(src)
    assert [r.id for r in recs] == ["k0"] and _same(recs[0].image, GOOD[0])
    assert dict(src.stats.skipped) == {"truncated_image": 1, "missing_image": 1, "missing_caption": 1}

    hf_src = open_source(tmp_path / "hf.parquet")
    hf = list(hf_src)
    assert [r.text for r in hf] == ["x", "y"] and _same(hf[0].image, GOOD[2]) and _same(hf[1].image, GOOD[3])
    assert dict(hf_src.stats.skipped) == {"missing_image": 1}

    with pytest.raises(ValueError, match="columns are"):
        open_source(d, text_column="nope")
    pq.write_table(pa.table({"blob": [b"x"], "words": ["y"]}), tmp_path / "odd.parquet")
    with pytest.raises(ValueError, match="image_column"):
        open_source(tmp_path / "odd.parquet")
    assert open_source(tmp_path / "odd.parquet", image_column="blob", text_column="words").text_column == "words"


# ------------------------------------------------------------------ our own format and detection


def test_dataset_source_and_kind_detection(tmp_path: Path):
    recs = [DocRecord(id=f"r{i}", text=f"t{i}", image=GOOD[i]) for i in range(3)]
    out = write_dataset(tmp_path / "ds", recs)
    src = open_source(out)
    got = list(src)
    assert src.kind == "dataset" and [r.text for r in got] == ["t0", "t1", "t2"] and _same(got[2].image, GOOD[2])
    assert src.stats.ok == 3
    assert detect_kind(out) == "dataset"
    assert len(list(open_source(out, limit=2))) == 2
    with pytest.raises(FileNotFoundError):
        open_source(tmp_path / "nothing.parquet")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="nothing to read"):
        open_source(tmp_path / "empty")
    with pytest.raises(ValueError, match="unknown source kind"):
        open_source(out, kind="csv")


def test_inspect_cli_reports_bad_rows(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    from cm3leon.cli import main

    d = _folder(tmp_path, sidecar=True)
    assert main(["data", "inspect", str(d), "--examples", "1"]) == 0
    out = capsys.readouterr().out
    assert "format:  folder" in out and "records: 4 read" in out
    assert "corrupt_image: 1" in out and "missing_caption: 1" in out and "truncated_image: 1" in out
    assert "caption            4" in out


def test_convert_cli_writes_a_dataset_of_the_good_rows(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    from cm3leon.cli import main
    from cm3leon.data.dataset import Dataset

    d = _folder(tmp_path, sidecar=False)
    out = tmp_path / "converted"
    assert main(["data", "convert", str(d), "--out", str(out)]) == 0
    assert "bad rows: 4 ok, 4 skipped" in capsys.readouterr().out
    ds = Dataset(out)
    assert len(ds) == 4 and ds.manifest["source"] == f"folder:{d}" and ds.tasks == {"caption": 4}
    by_id = {r.id: r for r in ds}
    assert by_id["sub/c.png"].text == "third" and _same(by_id["sub/c.png"].image, GOOD[2])
    assert by_id["a.png"].meta["file"] == "a.png"

"""`cm3leon quickstart --data` end to end on real data (scikit-learn's digits) at the tiny
`smoke` plan: every stage runs, bad rows are counted, the model directory works with
generate / caption / serve as it is, every layout goes through the same command."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from cm3leon.cli import main
from cm3leon.quickstart.own_data import (
    MIN_TRAIN,
    PlanRequest,
    Source,
    fingerprint,
    held_out,
    make_plan,
    min_records,
    run_own_data,
)
from helpers import build_tiny_clip

pytest.importorskip("sklearn")
ROOT = Path(__file__).resolve().parents[2]
N = 100  # the smallest data set the plan accepts is 79 records


def _digits_module():
    spec = importlib.util.spec_from_file_location("digits_to_folder", ROOT / "examples" / "digits_to_folder.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["digits_to_folder"] = mod
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def digits():
    return _digits_module().digit_images(32, N)


def _request(path: Path, kind: str) -> PlanRequest:
    return PlanRequest(source=Source(str(path.resolve()), kind, fingerprint(path)), smoke=True)


@pytest.fixture(scope="module")
def run(tmp_path_factory, digits):
    """A folder of digits with two bad rows (a corrupt PNG, an image without a caption), run once."""
    root = tmp_path_factory.mktemp("own")
    data = _digits_module().write_layout(root / "digits", digits, "folder")
    (data / "broken.png").write_bytes(b"not a png")
    Image.new("RGB", (32, 32), "white").save(data / "uncaptioned.png")
    with (data / "captions.jsonl").open("a") as f:
        f.write(json.dumps({"file": "broken.png", "text": "a broken file"}) + "\n")
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    lines: list[str] = []
    try:
        report = run_own_data(root / "run", _request(data, "folder"), echo=lines.append)
    finally:
        torch.set_num_threads(n)
    return root / "run", report, "\n".join(lines), data


def test_every_stage_runs_and_the_report_has_every_metric(run):
    out, report, plan, _ = run
    assert plan.startswith("plan (own-data-smoke): 100 good records of folder data")
    assert "estimated seconds per stage" in plan and "held out 20" in plan
    on_disk = json.loads((out / "report.json").read_text())
    assert {"data", "plan", "text_tokenizer", "image_tokenizer", "encoder", "index", "shards", "pretrain", "sft_shards",
            "sft", "model", "eval"} == set(on_disk["stage_seconds"])
    metrics = {(r["task"], r["metric"]): r["value"] for r in on_disk["metrics"]}
    assert {("t2i", "fd_encoder"), ("t2i", "clip_score"), ("t2i", "clip_score_real"), ("caption", "cider"),
            ("caption", "exact_match")} <= set(metrics)
    assert 0 <= metrics[("caption", "exact_match")] <= 1 and metrics[("t2i", "fd_encoder")] >= 0
    assert on_disk["data"]["n_train"] == 80 and on_disk["data"]["n_val"] == 20
    html = (out / "report.html").read_text()
    assert "eval/t2i.png" in html and "held-out caption" in html
    with Image.open(out / "eval" / "t2i.png") as grid:
        assert grid.width > 128 and grid.height > 128
    rows = [json.loads(x) for x in (out / "eval" / "t2i.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and all((out / "eval" / r["file"]).exists() for r in rows)
    assert all(r["prompt"].startswith("a handwritten digit ") for r in rows)


def test_bad_rows_are_counted_and_reported_not_fatal(run):
    out, report, plan, _ = run
    assert report["data"]["skipped"] == {"corrupt_image": 1, "missing_caption": 1}
    assert "2 bad rows skipped (corrupt_image 1, missing_caption 1)" in plan
    assert "corrupt_image: 1" in (out / "report.html").read_text()


def test_a_rerun_reuses_every_stage(run):
    out, report, _, data = run
    again = run_own_data(out, _request(data, "folder"), echo=lambda s: None)
    assert again["stage_seconds"] == report["stage_seconds"]


def test_generate_caption_and_serve_take_the_model_directory_as_it_is(run, tmp_path, capsys):
    out, report, _, _ = run
    model = out / "model"
    prompt = report["examples"]["t2i"][0]["prompt"]
    assert main(["generate", "--model", str(model), prompt, "--n", "2", "--out", str(tmp_path / "g.png")]) == 0
    with Image.open(tmp_path / "g.png") as im:
        assert im.width >= 32
    assert main(["caption", "--model", str(model), str(out / "eval" / "t2i" / "00000.png")]) == 0
    assert capsys.readouterr().out.strip() != ""
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from cm3leon.serve.app import ServeConfig, load_app

    with TestClient(load_app(model, ServeConfig(max_batch=2))) as client:
        r = client.post("/v1/images/generations", json={"prompt": prompt, "n": 1})
        assert r.status_code == 200, r.text
        assert r.json()["data"][0]["b64_json"]


def test_too_small_a_data_set_names_the_minimum(tmp_path, digits):
    data = _digits_module().write_layout(tmp_path / "few", digits[:50], "folder")
    with pytest.raises(ValueError, match=f"has 50 good records .* at least {min_records()} good image-caption"):
        run_own_data(tmp_path / "run", _request(data, "folder"), echo=lambda s: None)
    assert min_records() - held_out(min_records()) == MIN_TRAIN


def test_the_plan_scales_with_the_data_and_the_budget():
    assert [held_out(n) for n in (100, 1797, 10_000, 100_000)] == [20, 90, 500, 1000]
    src = Source("/data", "folder", "x")
    small = make_plan(PlanRequest(source=src, tokens=1_000_000), 1707, 90, 21)
    assert small.pretrain_steps == -(-1_000_000 // (small.pretrain_batch * small.seq_len))
    assert small.vq_preset == "shapes-32" and small.seq_len == 256 and small.sft_steps == small.pretrain_steps // 5
    short, long = (make_plan(PlanRequest(source=src, minutes=m), 1707, 90, 21) for m in (10, 20))
    assert long.pretrain_steps > short.pretrain_steps > 0
    assert make_plan(PlanRequest(source=src, image_size=64, tokens=10_000), 1707, 90, 21).vq_preset == "shapes-64"
    wide = make_plan(PlanRequest(source=src, image_size=128, tokens=10_000), 1707, 90, 21)
    assert wide.vq_preset == "shapes-128" and wide.model_overrides["d_model"] == 256
    assert wide.model_overrides["max_seq_len"] >= wide.seq_len >= 3 * 256  # 2 neighbours + the query fit
    with pytest.raises(ValueError, match="--minutes 1 leaves .* give at least --minutes"):
        make_plan(PlanRequest(source=src, minutes=1), 1707, 90, 21)
    with pytest.raises(ValueError, match="--image-size must be one of"):
        PlanRequest(source=src, image_size=48)


@pytest.mark.parametrize("layout", ["coco", "webdataset", "parquet"])
def test_every_layout_goes_through_the_same_command(tmp_path, digits, layout, capsys):
    data = _digits_module().write_layout(tmp_path / layout, digits, layout, per_shard=60)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        rc = main(["quickstart", "--data", str(data), "--preset", "smoke", "--out", str(tmp_path / "run")])
    finally:
        torch.set_num_threads(n)
    assert rc == 0
    printed = capsys.readouterr().out
    assert f"plan (own-data-smoke): 100 good records of {layout} data" in printed
    assert "model directory:" in printed and (tmp_path / "run" / "model" / "model.safetensors").exists()


def test_a_local_clip_is_the_retrieval_encoder(tmp_path, digits):
    pytest.importorskip("transformers")
    data = _digits_module().write_layout(tmp_path / "digits", digits, "folder")
    clip = build_tiny_clip(tmp_path / "clip")
    req = PlanRequest(source=Source(str(data), "folder", fingerprint(data)), smoke=True, clip=str(clip))
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    lines: list[str] = []
    try:
        report = run_own_data(tmp_path / "run", req, echo=lines.append)
    finally:
        torch.set_num_threads(n)
    assert f"retrieval encoder: CLIP from {clip}" in lines[0]
    assert report["encoder"]["kind"] == "clip"
    from cm3leon.pipeline import CM3Leon

    pipe = CM3Leon.from_pretrained(tmp_path / "run" / "model")
    assert type(pipe.encoder).__name__ == "CLIPEncoder" and pipe.encoder.dim == 16


def test_a_64_px_run_goes_end_to_end(tmp_path):
    data = _digits_module().write_layout(tmp_path / "digits64", _digits_module().digit_images(64, N), "folder")
    req = PlanRequest(source=Source(str(data), "folder", fingerprint(data)), smoke=True, image_size=64)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run_own_data(tmp_path / "run", req, echo=lambda s: None)
    finally:
        torch.set_num_threads(n)
    from cm3leon.pipeline import CM3Leon

    pipe = CM3Leon.from_pretrained(tmp_path / "run" / "model")
    assert pipe.image_tokenizer.cfg.resolution == 64
    assert pipe.generate_image("a handwritten digit 3", n=1).images[0].size == (64, 64)

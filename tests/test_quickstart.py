"""The main job end to end at the `smoke` preset: every stage runs, the report is well-formed,
and a rerun reuses finished stages."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch

from cm3leon.quickstart import PRESETS, get_preset, run_quickstart


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("qs") / "run"
    try:
        report = run_quickstart(out, "smoke")
    finally:
        torch.set_num_threads(n)
    return out, report


def test_report_files_and_metrics(run):
    out, report = run
    assert (out / "report.html").exists() and (out / "report.json").exists()
    on_disk = json.loads((out / "report.json").read_text())
    assert on_disk["preset"]["name"] == "smoke"
    stages = set(on_disk["stage_seconds"])
    assert {"data", "text_tokenizer", "image_tokenizer", "encoder", "index", "shards", "pretrain", "sft_shards",
            "sft", "eval_pretrained", "eval"} <= stages
    tasks = {r["task"] for r in on_disk["metrics"]}
    assert {"t2i", "caption", "vqa", "edit", "control", "ground"} <= tasks
    for r in on_disk["metrics"]:
        assert isinstance(r["sft"], float) and (math.isnan(r["sft"]) or r["sft"] >= 0), r
        if r["metric"].startswith(("judge", "vqa_accuracy", "caption_attribute", "edit_accuracy", "attr_")):
            assert 0.0 <= r["sft"] <= 1.0, r
    ab = on_disk["ablations"]
    assert {"cfg_1", "cfg_1.5", "cfg_3", "retrieve_0", "retrieve_1", "retrieve_2", "sampling_top_p", "sampling_cd_k",
            "sampling_mix", "rerank_on", "rerank_off"} <= set(ab)
    html = (out / "report.html").read_text()
    assert "Ablations" in html and "t2i.png" in html
    assert "CFG\n1.5" in html and "2 samples per prompt (all CFG + top-p)" in html  # the main setting
    assert (out / "model" / "model.safetensors").exists()
    assert "reranker" in stages and (out / "model" / "reranker" / "encoder.json").exists()  # smoke trains one


def test_rerun_reuses_stages(run):
    out, report = run
    again = run_quickstart(out, "smoke")
    assert again["stage_seconds"] == report["stage_seconds"]  # every stage reused, none re-run


def test_more_sft_records_redo_sft_only(run, tmp_path):
    """The SFT examples are a stage of their own: more of them redo SFT and its evaluation,
    not the pretraining shards, the pretrained model or its evaluation."""
    import shutil

    out, report = run
    copy = tmp_path / "run"
    shutil.copytree(out, copy)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        again = run_quickstart(copy, get_preset("smoke", sft_records=100))
    finally:
        torch.set_num_threads(n)
    before, after = report["stage_seconds"], again["stage_seconds"]
    for stage in ("data", "shards", "pretrain", "model_pretrained", "eval_pretrained"):
        assert after[stage] == before[stage], stage
    for stage in ("sft_shards", "sft", "eval"):
        assert after[stage] != before[stage], stage
    assert again["sft_shards"]["sft_records"] == 100 < report["sft_shards"]["sft_records"]


def test_a_stopped_training_stage_is_not_recorded_done_and_resumes(run, tmp_path, monkeypatch, capsys):
    """Ctrl-C / SIGTERM stops SFT with a checkpoint: the quickstart says so (exit 130) instead of
    recording the stage as done, and the same command resumes it; a stage an older version
    recorded as done after a stop is run again."""
    import shutil

    from cm3leon.cli import main
    from cm3leon.train import loop

    out, report = run
    copy = tmp_path / "run"
    shutil.copytree(out, copy)
    steps = report["sft"]["steps"] * 2

    class StopAtOnce(loop.StopRequest):
        def __init__(self) -> None:
            super().__init__()
            self.requested = True  # as if SIGTERM arrived before the first step

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with monkeypatch.context() as m:
            m.setattr(loop, "StopRequest", StopAtOnce)
            argv = ["quickstart", "--out", str(copy), "--preset", "smoke", "--sft-steps", str(steps)]
            assert main(argv) == 130
        err = capsys.readouterr().err
        assert "SFT stopped at step 0 (interrupted)" in err and "again to resume" in err
        assert not (copy / "sft" / "stage.json").exists()
        again = run_quickstart(copy, get_preset("smoke", sft_steps=steps))
        assert again["sft"]["steps"] == steps
        # an older version recorded a stopped stage as done: the recorded steps fall short
        marker = copy / "sft" / "stage.json"
        rec = json.loads(marker.read_text())
        rec["result"]["steps"] = 1
        marker.write_text(json.dumps(rec))
        third = run_quickstart(copy, get_preset("smoke", sft_steps=steps))
    finally:
        torch.set_num_threads(n)
    assert third["stage_seconds"]["sft"] != again["stage_seconds"]["sft"]  # run again (resumed: nothing left)
    assert json.loads(marker.read_text())["result"]["steps"] == steps
    assert third["stage_seconds"]["pretrain"] == report["stage_seconds"]["pretrain"]


def test_eval_cli_on_the_quickstart_model(run, tmp_path, capsys):
    """`cm3leon eval` as the docs show it, on the smoke run's models; bad sampling knobs are named."""
    from cm3leon.cli import main

    out, _ = run
    js = tmp_path / "m.json"
    argv = ["eval", "--model", str(out / "model_pretrained"), "--data", str(out / "data" / "val"), "--task", "t2i",
            "--task", "caption", "--n", "2", "--samples", "2", "--retrieve", "2", "--temperature", "0.5",
            "--top-p", "1.0", "--json", str(js)]
    assert main(argv) == 0
    got = json.loads(js.read_text())
    assert set(got) == {"t2i", "caption"}
    assert 0.0 <= got["t2i"]["metrics"]["judge_all_correct"] <= 1.0
    assert main([*argv[:-2], "--temperature", "0"]) != 0
    assert "temperature must be > 0" in capsys.readouterr().err


def test_presets_and_errors():
    assert {"smoke", "default", "gpu"} <= set(PRESETS)
    run = get_preset("default").pretrain_run(Path("/ws"), "cpu")
    assert run.model_overrides["image_tokens"] == 64 and run.model_overrides["image_axial"]
    assert run.data.train == str(Path("/ws/shards/pretrain").resolve())
    with pytest.raises(ValueError, match="unknown quickstart preset"):
        get_preset("huge")


def test_the_quickstart_trains_with_its_recipes_plus_overrides(run):
    """What the quickstart's training stages ran is ``get_recipe(name)`` with only the
    workspace paths, the seed and the device changed: `cm3leon train --recipe smoke` is the
    smoke preset's pretraining; the image-place embedding takes its sizes from the data."""
    from cm3leon.train.config import RunConfig
    from cm3leon.train.recipes import get_recipe

    out, report = run
    vocab = json.loads((out / "model" / "vocab.json").read_text())
    for stage, name in (("pretrain", "smoke"), ("sft", "sft-smoke")):
        rec = json.loads((out / stage / "stage.json").read_text())
        ran = RunConfig.from_dict({**rec["inputs"]["run"], "data": {**rec["inputs"]["run"]["data"], "train": "x"}})
        want = get_recipe(name)
        assert ran.train == dataclasses.replace(want.train, seed=0, device="cpu"), stage
        assert ran.model == want.model and ran.data.options == want.data.options, stage
        assert ran.data.seq_len == want.data.seq_len and ran.data.kind == want.data.kind, stage
        assert ran.model_overrides == want.model_overrides, stage
        # and the trained model has exactly the recipe's shape, its image places the data's
        cfg = json.loads((out / stage / "config.json").read_text())
        sized = {**want.model_overrides, "image_tokens": vocab["image_seq_len"], "image_vocab": vocab["image_size"]}
        for k, v in sized.items():
            assert cfg[k] == v, (stage, k)
    assert report["pretrain"]["steps"] == get_recipe("smoke").train.steps
    assert report["sft"]["steps"] == get_recipe("sft-smoke").train.steps


def test_model_directories_carry_the_measured_decoding_defaults(run):
    from cm3leon.generate.generation_config import GenerationConfig
    from cm3leon.quickstart import SHAPES_GENERATION

    out, _ = run
    for d in ("model", "model_pretrained"):
        assert GenerationConfig.load(out / d) == SHAPES_GENERATION
    t2i = SHAPES_GENERATION.text_to_image
    assert (t2i.sampling.guidance, t2i.sampling.temperature, t2i.sampling.top_p, t2i.samples, t2i.mode,
            t2i.rerank, t2i.retrieve) == (1.5, 0.5, 1.0, 16, "top_p", True, 0)
    e = SHAPES_GENERATION.edit.sampling
    assert (e.image_guidance, e.text_guidance, e.temperature, e.top_p) == (1.25, 1.25, 0.5, 1.0)


def test_stage_with_changed_inputs_is_redone_from_an_empty_folder(tmp_path):
    from cm3leon.quickstart import Stages

    def stage(tag):
        def fn(d):
            assert not (d / "old.txt").exists(), "stale outputs of the earlier run were left behind"
            (d / "old.txt").write_text(tag)
            return {"tag": tag}
        return fn

    p = get_preset("smoke")
    assert Stages(tmp_path, p).run("s", stage("a"), ("encoder_steps",)) == {"tag": "a"}
    assert Stages(tmp_path, p).run("s", stage("never"), ("encoder_steps",)) == {"tag": "a"}  # reused
    p2 = get_preset("smoke", encoder_steps=p.encoder_steps + 1)
    assert Stages(tmp_path, p2).run("s", stage("b"), ("encoder_steps",)) == {"tag": "b"}
    assert (tmp_path / "s" / "old.txt").read_text() == "b"
    assert Stages(tmp_path, p2).run("s", stage("c"), ("encoder_steps",), inputs={"run": {"lr": 1}}) == {"tag": "c"}


def test_a_stage_reruns_only_when_its_own_or_upstream_inputs_change(tmp_path):
    """Changing an evaluation knob of the pretrained model must not redo SFT (a sibling stage)."""
    from cm3leon.quickstart import EvalStage, Stages

    ran: list[str] = []

    def stage(name):
        def fn(d):
            ran.append(name)
            return {}
        return fn

    def pipeline(p, pre_steps=24):
        st = Stages(tmp_path, p)
        st.run("pretrain", stage("pretrain"), inputs={"run": {"steps": pre_steps}})
        st.run("eval_pretrained", stage("eval_pretrained"), ("eval",), after=("pretrain",))
        st.run("sft", stage("sft"), ("sft_steps",), after=("pretrain",))
        st.run("eval", stage("eval"), ("eval",), after=("sft",))

    p = get_preset("smoke")
    pipeline(p)
    assert ran == ["pretrain", "eval_pretrained", "sft", "eval"]
    ran.clear()
    pipeline(get_preset("smoke", eval=EvalStage(n=7)))
    assert ran == ["eval_pretrained", "eval"]
    ran.clear()
    pipeline(get_preset("smoke", eval=EvalStage(n=7)), pre_steps=25)
    assert ran == ["pretrain", "eval_pretrained", "sft", "eval"]
    with pytest.raises(ValueError, match="have not run yet"):
        Stages(tmp_path, p).run("x", stage("x"), after=("nope",))


def test_cli_seed_reaches_the_preset(monkeypatch, tmp_path):
    from cm3leon import quickstart
    from cm3leon.cli import main
    from cm3leon.train.recipes import SFT_MIXES

    seen = {}

    def fake_run(out, preset, device="auto", force=False):
        seen["seed"], seen["sft_steps"] = preset.seed, preset.sft_steps
        seen["mix"], seen["records"] = preset.sft_mix, preset.sft_records
        return {"metrics": [], "stage_seconds": {}}

    monkeypatch.setattr(quickstart, "run_quickstart", fake_run)
    assert main(["quickstart", "--out", str(tmp_path), "--preset", "smoke", "--seed", "3"]) == 0
    smoke = quickstart.get_preset("smoke")
    assert seen == {"seed": 3, "sft_steps": None, "mix": None, "records": smoke.sft_records}
    assert main(["quickstart", "--out", str(tmp_path), "--preset", "smoke", "--sft-steps", "40",
                 "--sft-records", "90"]) == 0
    assert seen == {"seed": 0, "sft_steps": 40, "mix": None, "records": 90}
    assert main(["quickstart", "--out", str(tmp_path), "--preset", "default", "--sft-mix", "copy"]) == 0
    assert seen["mix"] == "copy" and seen["sft_steps"] is None
    # the CLI lists the mixes literally (it must not import torch to build its parser)
    from cm3leon.cli import build_parser

    sub = next(a for a in build_parser()._actions if a.dest == "command").choices["quickstart"]
    assert set(next(a for a in sub._actions if a.dest == "sft_mix").choices) == set(SFT_MIXES)
    with pytest.raises(SystemExit, match="sft-steps"):
        main(["quickstart", "--out", str(tmp_path), "--preset", "smoke", "--sft-steps", "0"])
    with pytest.raises(SystemExit, match="sft-records"):
        main(["quickstart", "--out", str(tmp_path), "--preset", "smoke", "--sft-records", "-1"])


def test_sft_steps_and_mix_reach_the_sft_run():
    from cm3leon.train.recipes import SHAPES_SFT_SHARES_COPY, get_recipe

    run = get_preset("default", sft_steps=3840, sft_mix="copy").sft_run(Path("/ws"), "cpu")
    assert run.train == dataclasses.replace(get_recipe("sft-quickstart", steps=3840).train, device="cpu")
    assert run.train.warmup_steps == 192 and run.train.ckpt_every == 1920  # the schedule follows the steps
    assert run.data.options["target_shares"] == SHAPES_SFT_SHARES_COPY
    assert run.init_from == str(Path("/ws/pretrain").resolve())


def test_t2i_grid_shows_every_object_count():
    """The report's grids share their 8 rows among the 1- and 2-object prompts."""
    import numpy as np

    from cm3leon.eval.harness import _grid_rows

    assert _grid_rows(np.array([1] * 64 + [2] * 64), 8) == [0, 1, 2, 3, 64, 65, 66, 67]
    assert _grid_rows(np.array([1, 1, 1]), 8) == [0, 1, 2]
    assert _grid_rows(np.array([2, 1, 2, 1, 1, 1]), 4) == [0, 1, 2, 3]


def test_eval_t2i_rejects_an_unknown_sampling_mode():
    from types import SimpleNamespace

    from cm3leon.eval.harness import EvalConfig, eval_t2i
    from cm3leon.generate.generation_config import PAPER_DEFAULTS

    with pytest.raises(ValueError, match="mode must be one of"):
        eval_t2i(SimpleNamespace(generation_config=PAPER_DEFAULTS), [], EvalConfig(), mode="beam")  # type: ignore


def test_eval_t2i_judges_the_pick_when_reranking_and_every_sample_otherwise():
    from types import SimpleNamespace

    from PIL import Image

    from cm3leon.eval.harness import EvalConfig, eval_t2i
    from cm3leon.generate.generation_config import PAPER_DEFAULTS
    from cm3leon.shapes.dataset import iter_examples
    from cm3leon.shapes.world import ShapesConfig

    recs = [r for r in iter_examples(40, ShapesConfig(size=32, max_objects=1), seed=3)][:4]
    blank = Image.new("RGB", (32, 32), (255, 255, 255))

    class Pipe:  # sample 0 is the real image (right), sample 1 a blank canvas (wrong)
        encoder = None
        reranker = object()
        generation_config = PAPER_DEFAULTS

        def generate_images(self, prompts, n, **kw):
            by_caption = {r.meta["captions"]["detailed"]: r.image for r in recs}
            return [SimpleNamespace(images=[by_caption[p], blank][:n]) for p in prompts]

    cfg = EvalConfig()
    picked = eval_t2i(Pipe(), recs, cfg, samples=2, rerank=True).metrics  # type: ignore[arg-type]
    every = eval_t2i(Pipe(), recs, cfg, samples=2, rerank=False).metrics  # type: ignore[arg-type]
    assert picked["judge_all_correct_1obj"] == 1.0
    assert every["judge_all_correct_1obj"] == 0.5


def test_preset_rejects_bad_knobs():
    with pytest.raises(ValueError, match="sft_mix"):
        get_preset("smoke", sft_mix="beam")
    with pytest.raises(ValueError, match="unknown recipe"):
        get_preset("smoke", pretrain="nope")
    with pytest.raises(ValueError, match="sft_steps"):
        get_preset("smoke", sft_steps=0)

"""`cm3leon train` / `cm3leon sft` end to end on tiny tokenized shards."""

from __future__ import annotations

import json
import math

import pytest

from cm3leon.cli import main
from cm3leon.data.shards import write_documents
from cm3leon.model.io import load_model
from cm3leon.train.config import DataConfig, RunConfig, TrainConfig
from cm3leon.train.recipes import RECIPES
from cm3leon.vocab import Vocab
from helpers import VOCAB, SynthData, one_thread


@pytest.fixture(autouse=True)
def _single_thread():
    with one_thread():
        yield


def _docs(n: int, seed: int) -> list[list[int]]:
    data = SynthData(n=n, seed=seed)
    return [[int(x) for x in data[i]["ids"] if x != VOCAB.pad_id] for i in range(n)]


@pytest.fixture
def workspace(tmp_path):
    write_documents(tmp_path / "shards" / "pretrain", VOCAB, _docs(16, 0))
    write_documents(tmp_path / "shards" / "val", VOCAB, _docs(4, 1))
    write_documents(tmp_path / "shards" / "sft", VOCAB, _docs(8, 2))
    run = RunConfig(
        name="cli-test", model="tiny", model_overrides={"d_model": 32, "n_layers": 2, "n_heads": 4, "max_seq_len": 64},
        train=TrainConfig(steps=4, batch_size=4, lr=3e-3, warmup_steps=1, log_every=1, eval_every=2, eval_batches=1,
                          ckpt_every=2, unigram_samples=8),
        data=DataConfig(train="shards/pretrain", val="shards/val", seq_len=32, options={"n_retrieved": 0}),
    )
    (tmp_path / "pre.json").write_text(run.to_json())
    sft = RunConfig(name="cli-sft", model="tiny", init_from="run", train=run.train,
                    data=DataConfig(train="shards/sft", kind="sft", seq_len=32))
    (tmp_path / "sft.json").write_text(sft.to_json())
    return tmp_path


def _files(d):
    return {p.relative_to(d): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def test_list_and_print(capsys):
    assert main(["train", "--list-recipes"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in RECIPES)
    assert main(["train", "--recipe", "paper-350m", "--print-config", "--override", "lr=1e-4"]) == 0
    printed = RunConfig.from_dict(json.loads(capsys.readouterr().out))
    assert printed.train.lr == 1e-4 and printed.model == "350m"


def test_unknown_recipe_and_missing_data_are_one_line_errors(tmp_path, capsys):
    assert main(["train", "--recipe", "nope", "--out", str(tmp_path / "x")]) == 1
    assert "unknown recipe 'nope'" in capsys.readouterr().err
    assert main(["train", "--recipe", "smoke", "--out", str(tmp_path / "x")]) == 1
    err = capsys.readouterr().err
    assert "shards/pretrain not found" in err and "--workspace" in err
    assert not (tmp_path / "x").exists()


def test_train_resume_and_sft(workspace, capsys):
    out = workspace / "run"
    assert main(["train", "--config", str(workspace / "pre.json"), "--out", str(out), "--no-progress",
                 "--until-step", "2"]) == 0
    assert json.loads(capsys.readouterr().out)["status"] == "paused"
    assert main(["train", "--config", str(workspace / "pre.json"), "--out", str(out), "--no-progress"]) == 1
    assert "--resume" in capsys.readouterr().err
    assert main(["train", "--config", str(workspace / "pre.json"), "--out", str(out), "--no-progress",
                 "--resume"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["status"] == "completed" and summary["step"] == 4
    assert {"loss", "loss_text", "loss_image"} <= set(summary["val"])
    model = load_model(out)
    assert model.cfg.d_model == 32 and json.loads((out / "vocab.json").read_text()) == VOCAB.to_dict()
    assert (out / "loss.png").stat().st_size > 1000

    # A finished run is never overwritten.
    before = _files(out)
    assert main(["train", "--config", str(workspace / "pre.json"), "--out", str(out), "--no-progress"]) == 1
    assert _files(out) == before

    # SFT starts from the pretrained weights: its first loss is far below log(V) of a fresh model.
    sft_out = workspace / "sft-run"
    assert main(["sft", "--base", str(out), "--config", str(workspace / "sft.json"), "--out", str(sft_out),
                 "--no-progress"]) == 0
    capsys.readouterr()
    first = [json.loads(x) for x in (sft_out / "metrics.jsonl").read_text().splitlines()
             if '"train"' in x][0]
    assert first["loss"] < math.log(VOCAB.size) - 0.1
    assert load_model(sft_out).cfg == model.cfg


def test_sft_refuses_a_base_with_another_vocabulary(workspace, capsys):
    out = workspace / "run"
    assert main(["train", "--config", str(workspace / "pre.json"), "--out", str(out), "--no-progress"]) == 0
    other = Vocab(text_size=21, image_size=16, image_seq_len=8)
    write_documents(workspace / "shards" / "sft", other, [[1, other.text_offset + 20]], overwrite=True)
    assert main(["sft", "--base", str(out), "--config", str(workspace / "sft.json"), "--out",
                 str(workspace / "s"), "--no-progress"]) == 1
    assert "tokenize the SFT data with the pretraining tokenizers" in capsys.readouterr().err
    assert main(["sft", "--base", str(workspace / "nothing"), "--config", str(workspace / "sft.json"), "--out",
                 str(workspace / "s")]) == 1
    assert "holds no model.safetensors" in capsys.readouterr().err


def test_resume_with_another_preset_is_refused(workspace, capsys):
    out = workspace / "run"
    args = ["train", "--config", str(workspace / "pre.json"), "--out", str(out), "--no-progress"]
    assert main([*args, "--until-step", "2"]) == 0
    before = _files(out)
    assert main([*args, "--resume", "--override", "model_overrides.d_model=64"]) == 1
    assert "d_model: checkpoint 32 vs run 64" in capsys.readouterr().err
    assert _files(out) == before

"""`cm3leon sft --lora ... --merge` end to end on a tiny model directory, then `cm3leon generate` on the merge."""

from __future__ import annotations

import json

import pytest
import torch

from cm3leon.cli import main
from cm3leon.config import load_json
from cm3leon.data.shards import write_documents
from cm3leon.model.io import load_model
from cm3leon.safetensors_io import read_safetensors
from cm3leon.train.config import DataConfig, RunConfig, TrainConfig
from cm3leon.vocab import Vocab
from helpers import build_tiny_model_dir, one_thread


@pytest.fixture(autouse=True)
def _single_thread():
    with one_thread():
        yield


@pytest.fixture
def workspace(tmp_path):
    model = build_tiny_model_dir(tmp_path / "base", resolution=16, encoder=False)
    vocab = Vocab.from_dict(load_json(model / "vocab.json"))
    g = torch.Generator().manual_seed(0)
    docs = []
    for _ in range(8):  # "<eos> caption <break> image": the image follows from the first text id
        text = torch.randint(0, 40, (4,), generator=g).tolist()
        codes = [(text[0] + k) % vocab.image_size for k in range(vocab.image_seq_len)]
        docs.append([vocab.eos_id, *vocab.text_to_ids(text), vocab.break_id, *vocab.codes_to_ids(codes)])
    write_documents(tmp_path / "shards" / "sft", vocab, docs)
    run = RunConfig(name="lora-cli", model="tiny", train=TrainConfig(
        steps=3, batch_size=4, lr=1e-2, warmup_steps=0, log_every=1, ckpt_every=0, eval_batches=1,
        unigram_samples=4), data=DataConfig(train="shards/sft", kind="sft", seq_len=80))
    (tmp_path / "sft.json").write_text(run.to_json())
    return tmp_path


def test_sft_lora_merge_then_generate(workspace, capsys, caplog):
    out = workspace / "lora"
    args = ["sft", "--base", str(workspace / "base"), "--config", str(workspace / "sft.json"), "--out", str(out),
            "--no-progress", "--lora", "r=4,alpha=8,targets=q_proj,k_proj,v_proj,o_proj,dropout=0.05", "--merge"]
    with caplog.at_level("INFO"):
        assert main(args) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["status"] == "completed" and summary["merged"] == str(out / "merged")
    assert "memory plan per rank" in caplog.text and "*LoRA " in caplog.text
    adapter = read_safetensors(out / "adapter" / "adapter_model.safetensors")
    assert adapter and all(k.startswith("base_model.model.blocks.") for k in adapter)
    assert {k.split(".")[-3] for k in adapter} == {"qkv", "out"}
    assert json.loads((out / "adapter" / "adapter_config.json").read_text())["target_modules"] == ["out", "qkv"]
    base, merged = load_model(workspace / "base"), load_model(out / "merged")
    assert torch.equal(base.tok_emb.weight, merged.tok_emb.weight)
    assert not torch.equal(base.blocks[0].attn.qkv.weight, merged.blocks[0].attn.qkv.weight)
    assert (out / "merged" / "text_tokenizer").is_dir() and not (out / "merged" / "checkpoints").exists()
    # a finished run merges again with --resume (nothing more trains)
    assert main([*args[:-1], "--resume", "--merge", str(workspace / "again")]) == 0
    assert json.loads(capsys.readouterr().out)["step"] == 3
    again = load_model(workspace / "again")
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), merged.state_dict().values()))
    png = workspace / "g.png"
    assert main(["generate", "--model", str(out / "merged"), "a red circle", "--n", "1", "--no-rerank",
                 "--out", str(png)]) == 0
    assert png.stat().st_size > 100


def test_lora_flags_are_one_line_errors(workspace, capsys):
    base = ["sft", "--base", str(workspace / "base"), "--config", str(workspace / "sft.json"), "--no-progress"]
    assert main([*base, "--out", str(workspace / "a"), "--merge"]) == 1
    assert "--merge merges LoRA adapters" in capsys.readouterr().err
    assert main([*base, "--out", str(workspace / "b"), "--lora", "r=4,targets=q_proj"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "fused Linear 'qkv'" in err
    assert main([*base, "--out", str(workspace / "c"), "--lora", "r=4,rank=3"]) == 1
    assert "unknown key 'rank'" in capsys.readouterr().err


class _Rows:
    """Training rows ``{"ids", "labels"}`` of fixed documents (next-token loss on every id)."""

    def __init__(self, docs: list[list[int]], seq_len: int) -> None:
        self.docs, self.T = docs, seq_len

    def __len__(self) -> int:
        return len(self.docs)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids = torch.tensor(self.docs[i][: self.T])
        return {"ids": ids, "labels": ids.clone()}


@pytest.mark.slow  # ~11 s: builds, saves and converts a transformers checkpoint
def test_lora_on_a_converted_chameleon(tmp_path, capsys):
    """A converted tiny Chameleon (sharded weights, its own id table) takes adapters named by the
    Chameleon block, merges shard by shard, and `cm3leon generate` runs on the merge."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "model"))
    from chameleon_fixtures import build_checkpoint

    from cm3leon.model.io import load_config, weight_files
    from cm3leon.train.loop import train
    from cm3leon.train.lora import LoraSpec, merge_adapter
    from cm3leon.vocab import Kind

    build_checkpoint(tmp_path / "hf")
    base = tmp_path / "converted"
    assert main(["convert", "chameleon", "--hf", str(tmp_path / "hf"), "--out", str(base)]) == 0
    assert len(weight_files(base)) > 1
    vocab = Vocab.from_dict(load_json(base / "vocab.json"))
    g = torch.Generator().manual_seed(0)
    docs = []
    for _ in range(8):
        text = torch.randint(0, vocab.text_size, (4,), generator=g).tolist()
        codes = [(text[0] + k) % vocab.image_size for k in range(vocab.image_seq_len)]
        docs.append([vocab.eos_id, *vocab.text_to_ids(text), *vocab.segment_prefix(Kind.IMAGE, first=False),
                     *vocab.codes_to_ids(codes), *vocab.segment_suffix(Kind.IMAGE)])
    cfg = TrainConfig(steps=3, batch_size=4, lr=1e-2, warmup_steps=0, log_every=1, ckpt_every=0, eval_batches=1,
                      unigram_samples=4)
    res = train(load_config(base), cfg, _Rows(docs, 48), tmp_path / "lora", vocab=vocab, init_from=base,
                progress=False, lora=LoraSpec(r=2, alpha=4, targets=("q_proj", "v_proj", "down_proj")))
    adapter = read_safetensors(res.model_dir / "adapter_model.safetensors")
    assert {k.split(".")[-3] for k in adapter} == {"q_proj", "v_proj", "down_proj"}
    merged = merge_adapter(res.model_dir, tmp_path / "merged")
    assert [f.name for f in weight_files(merged)] == [f.name for f in weight_files(base)]
    a, b = load_model(base).state_dict(), load_model(merged).state_dict()
    changed = {k for k in a if not torch.equal(a[k], b[k])}
    assert changed and all(k.endswith(("q_proj.weight", "v_proj.weight", "down_proj.weight")) for k in changed)
    capsys.readouterr()
    png = tmp_path / "g.png"
    assert main(["generate", "--model", str(merged), "a red circle", "--n", "1", "--no-rerank", "--out",
                 str(png)]) == 0
    assert png.stat().st_size > 100

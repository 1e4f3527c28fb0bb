"""SFT on a converted tiny Chameleon from the CLI, as docs/sft.md and docs/chameleon.md describe it:
`cm3leon data tokenize --model CONVERTED --sft --sft-jsonl` -> `cm3leon sft --lora ... --merge` ->
`cm3leon generate` / `cm3leon caption` / an interleaved prompt on the merge."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from PIL import Image

from cm3leon.cli import main
from cm3leon.data.shards import Shards, write_documents
from cm3leon.train.config import DataConfig, RunConfig, TrainConfig
from cm3leon.vocab import Vocab
from helpers import one_thread

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "model"))
from chameleon_fixtures import build_checkpoint  # noqa: E402

COLORS = {"w1": (255, 0, 0), "w2": (0, 255, 0), "w3": (0, 0, 255), "w4": (255, 255, 0)}


@pytest.fixture(autouse=True)
def _single_thread():
    with one_thread():
        yield


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("chameleon")
    build_checkpoint(d / "hf", shard_size=None)
    assert main(["convert", "chameleon", "--hf", str(d / "hf"), "--out", str(d / "converted")]) == 0
    return d / "converted"


def _user_sft(d: Path) -> Path:
    """A user SFT jsonl (docs/sft.md): captions and text-to-image over the tiny tokenizer's words."""
    d.mkdir()
    lines = []
    for k in range(16):
        w = list(COLORS)[k % 4]
        Image.new("RGB", (16, 16), COLORS[w]).save(d / f"{w}.png")
        task = ("caption", "text_to_image")[k % 2]
        lines.append({"task": task, "fields": {"caption": f"w5 {w}", "image": f"{w}.png"}, "variant": 0})
    (d / "sft.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    return d / "sft.jsonl"


def test_sft_lora_on_a_converted_chameleon_from_the_cli(converted, tmp_path, capsys, monkeypatch):
    jsonl = _user_sft(tmp_path / "user")
    # the converted model's tokenizer alone does not know the model's ids: one line naming --model
    assert main(["data", "tokenize", "--text-tokenizer", str(converted / "text_tokenizer"), "--image-tokenizer",
                 str(converted / "image_tokenizer"), "--sft", "--sft-jsonl", str(jsonl),
                 "--out", str(tmp_path / "x")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "give --model MODEL_DIR" in err
    shards_dir = tmp_path / "ws" / "shards" / "sft"
    assert main(["data", "tokenize", "--model", str(converted), "--sft", "--sft-jsonl", str(jsonl),
                 "--out", str(shards_dir)]) == 0
    assert "wrote 16 SFT examples" in capsys.readouterr().out
    shards = Shards(shards_dir)
    vocab = shards.vocab
    assert vocab.ids is not None and shards.manifest["task_counts"] == {"caption": 8, "text_to_image": 8}
    t = vocab.ids
    doc = shards[0]  # caption: <s> <racm3:break> IMAGE <eoss> caption </s>
    assert doc[:2] == [t.doc_start, t.begin_image] and doc[2 + vocab.image_seq_len] == t.end_image
    assert doc[-1] == t.end_text and shards.target(0) == (3 + vocab.image_seq_len, len(doc) - 1)

    plain = Vocab(text_size=vocab.text_size, image_size=vocab.image_size, image_seq_len=vocab.image_seq_len)
    write_documents(tmp_path / "plain" / "shards" / "sft", plain, [[plain.eos_id, plain.text_to_ids([5])[0]]])
    run = RunConfig(name="chameleon-lora", model="tiny", train=TrainConfig(
        steps=8, batch_size=4, lr=1e-2, warmup_steps=0, log_every=1, ckpt_every=0, eval_batches=1,
        unigram_samples=4), data=DataConfig(train="shards/sft", kind="sft", seq_len=64))
    (tmp_path / "sft.json").write_text(run.to_json())
    # shards in cm3leon's own layout do not fit the converted base: one line naming data tokenize --model
    assert main(["sft", "--base", str(converted), "--config", str(tmp_path / "sft.json"), "--out",
                 str(tmp_path / "plain" / "lora"), "--no-progress", "--lora", "r=4"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"cm3leon data tokenize --model {converted} --sft" in err
    out = tmp_path / "ws" / "lora"
    assert main(["sft", "--base", str(converted), "--config", str(tmp_path / "sft.json"), "--out", str(out),
                 "--no-progress", "--lora", "r=4,alpha=8,targets=q_proj,v_proj", "--merge"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["status"] == "completed" and summary["merged"] == str(out / "merged")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if r.get("split") == "train"]
    assert len(losses) == 8 and sum(losses[-2:]) / 2 < losses[0], losses

    png = tmp_path / "g.png"
    assert main(["generate", "--model", str(out / "merged"), "w5 w1", "--n", "1", "--no-rerank",
                 "--out", str(png)]) == 0
    assert png.stat().st_size > 100
    assert main(["caption", "--model", str(out / "merged"), str(tmp_path / "user" / "w1.png")]) == 0

    # an interleaved prompt on the merge: one document in the model's own layout
    import cm3leon.pipeline as pipeline_mod

    m = pipeline_mod.CM3Leon.from_pretrained(out / "merged")
    seen, decode = [], pipeline_mod.generate_image_tokens
    monkeypatch.setattr(pipeline_mod, "generate_image_tokens",
                        lambda model, vocab, prompts, cfg, **kw: seen.append(prompts[0]) or decode(
                            model, vocab, prompts, cfg, **kw))
    red = tmp_path / "user" / "w1.png"
    assert len(m.interleaved(["w5 w1", red, "w6"], output="image", n=1)) == 1
    img = vocab.codes_to_ids(m.encode_images([Image.open(red)])[0].tolist())
    assert seen == [[t.doc_start, *m.text_ids("w5 w1"), t.begin_image, *img, t.end_image, *m.text_ids("w6"),
                     t.begin_image]]
    assert isinstance(m.interleaved([red, "w5"], output="text", max_new_tokens=3), str)

"""`cm3leon model assemble`: parts that fit make a directory every command loads; each missing or
mismatched part is named in one error, and nothing is written."""

from __future__ import annotations

import pytest

from cm3leon.cli import main
from cm3leon.model_dir import ModelParts, PartsError, assemble_model_dir, check_parts
from cm3leon.pipeline import CM3Leon
from cm3leon.tokenize.text_bpe import TextTokenizer
from helpers import build_tiny_model_dir


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    root = tmp_path_factory.mktemp("parts")
    return build_tiny_model_dir(root / "a"), build_tiny_model_dir(root / "b", resolution=16), root


def _args(d, **over):
    a = {"--text-tokenizer": d / "text_tokenizer", "--image-tokenizer": d / "image_tokenizer", "--model": d,
         "--retriever": d / "retrieval" / "encoder"}
    a.update(over)
    return [x for k, v in a.items() for x in (k, str(v))]


def test_fitting_parts_make_a_model_directory(parts, tmp_path, capsys):
    a, _, _ = parts
    gen = tmp_path / "generation_config.json"
    gen.write_text('{"text_to_image": {"samples": 2, "rerank": true}}')
    out = tmp_path / "model"
    assert main(["model", "assemble", *_args(a), "--generation-config", str(gen), "--out", str(out)]) == 0
    assert f"model directory: {out}" in capsys.readouterr().out
    pipe = CM3Leon.from_pretrained(out)
    assert pipe.encoder is not None and pipe.generation_config.text_to_image.samples == 2
    assert main(["generate", "--model", str(out), "a red circle", "--out", str(tmp_path / "g.png")]) == 0
    assert main(["model", "assemble", *_args(a), "--out", str(out)]) == 1  # exists: refused without --overwrite
    assert main(["model", "assemble", *_args(a), "--out", str(out), "--overwrite"]) == 0


def test_every_missing_or_mismatched_part_is_named_in_one_line(parts, tmp_path, capsys):
    a, b, root = parts
    big = TextTokenizer.train([f"word{i} token{i * 7} thing{i * 13}" for i in range(400)], 700, min_frequency=1)
    big.save(root / "big_text")
    assert big.vocab_size > 300
    out = tmp_path / "model"
    rc = main(["model", "assemble", *_args(a, **{"--text-tokenizer": root / "big_text",
                                                  "--image-tokenizer": b / "image_tokenizer",
                                                  "--retriever": root / "nowhere"}), "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert rc == 1 and len(err.splitlines()) == 1 and err.startswith("error: cannot assemble a model directory")
    assert f"text tokenizer: {root / 'big_text'} has {big.vocab_size} ids but the model's vocabulary only" in err
    assert "image tokenizer:" in err and "makes 64 tokens per image from 16 codes but the model expects 256" in err
    assert f"retriever: {root / 'nowhere'} is not a directory" in err
    assert not out.exists() and not (tmp_path / "model.assembling").exists()


def test_check_parts_names_missing_files_and_a_model_without_vocab(parts, tmp_path):
    a, _, _ = parts
    empty = tmp_path / "empty"
    empty.mkdir()
    problems = check_parts(ModelParts(text_tokenizer=empty, image_tokenizer=a / "image_tokenizer", model=empty))
    assert problems == [f"model: {empty} has no config.json, model.safetensors, vocab.json",
                        f"text tokenizer: {empty} has no tokenizer.json"]
    with pytest.raises(PartsError, match="model: .* has no config.json"):
        assemble_model_dir(ModelParts(text_tokenizer=empty, image_tokenizer=a / "image_tokenizer", model=empty),
                           tmp_path / "out")

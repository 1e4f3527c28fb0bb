"""Image tokenizer training: losses, resume, outputs, LPIPS/PatchGAN options, CLI."""

import dataclasses
import json

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from cm3leon.tokenize.image_vq import ImageTokenizer, VQConfig
from cm3leon.tokenize.image_vq_losses import LPIPS, PatchDiscriminator, load_lpips
from cm3leon.tokenize.image_vq_train import (
    VQTrainConfig,
    clamp_straight_through,
    evaluate,
    lr_at,
    psnr,
    train_image_tokenizer,
)

TINY = VQConfig(resolution=16, ch=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(), mid_attn=False,
                z_channels=8, embed_dim=4, codebook_size=16, l2_norm_codes=True, num_groups=4)
FAST = VQTrainConfig(steps=6, batch_size=4, lr=3e-3, warmup_steps=2, log_every=2, sample_every=3,
                     checkpoint_every=2, restart_every=0, eval_batch_size=8)


# Tiny models gain nothing from threads, and on a shared CPU extra threads stall each other.
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _pil_shapes(n: int, size: int = 16, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        im = Image.new("RGB", (size, size), (255, 255, 255))
        d = ImageDraw.Draw(im)
        x, y = rng.integers(0, size // 2, 2)
        s = int(rng.integers(3, size // 2))
        color = tuple(int(c) for c in rng.integers(0, 256, 3))
        (d.ellipse if rng.random() < 0.5 else d.rectangle)([int(x), int(y), int(x) + s, int(y) + s], fill=color)
        out.append(im)
    return out


def _u8(images: list[Image.Image]) -> torch.Tensor:
    return torch.from_numpy(np.stack([np.asarray(i) for i in images])).permute(0, 3, 1, 2).contiguous()


@pytest.fixture(scope="module")
def data():
    return _u8(_pil_shapes(24)), _u8(_pil_shapes(8, seed=1))


def test_psnr_reference():
    x = torch.zeros(1, 3, 4, 4)
    y = x + 0.2  # error 0.1 on the [0, 1] scale -> MSE 0.01 -> 20 dB
    assert float(psnr(x, y)[0]) == pytest.approx(20.0, abs=1e-4)


def test_clamp_straight_through():
    x = torch.tensor([-1.5, 0.3, 1.2], requires_grad=True)
    target = torch.tensor([-1.0, 0.0, 0.9])
    y = clamp_straight_through(x)
    assert torch.equal(y.detach(), torch.tensor([-1.0, 0.3, 1.0]))
    (y - target).abs().sum().backward()
    # saturated and on target: no push; overshoot past a non-saturated target: pushed back
    assert torch.equal(x.grad, torch.tensor([0.0, 1.0, 1.0]))


def test_lr_schedule():
    cfg = VQTrainConfig(steps=100, lr=1.0, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_at(0, cfg) == pytest.approx(0.1)
    assert lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(99, cfg) == pytest.approx(0.1, abs=1e-3)
    assert all(lr_at(s, cfg) >= lr_at(s + 1, cfg) for s in range(10, 99))


def test_training_writes_outputs_and_reduces_loss(data, tmp_path):
    train, val = data
    logs = []
    cfg = dataclasses.replace(FAST, steps=30, log_every=10, restart_every=5)
    m = train_image_tokenizer(TINY, cfg, train, val, tmp_path, progress=False, on_log=logs.append)
    assert logs[-1]["l1"] < logs[0]["l1"]
    assert {"usage", "perplexity", "psnr_batch"} <= set(logs[0])
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved == m
    assert m["steps"] == 30 and 0 < m["val_codebook_usage"] <= 1 and m["val_psnr"] > 5
    assert (tmp_path / "samples" / "final.png").is_file()
    model = ImageTokenizer.from_pretrained(tmp_path)
    again = evaluate(model, val)
    assert again["psnr"] == pytest.approx(m["val_psnr"], abs=1e-4)
    assert (tmp_path / "checkpoint" / "optimizer.safetensors").is_file()
    assert len((tmp_path / "log.jsonl").read_text().splitlines()) == 3


class _Interrupt(Exception):
    pass


def test_resume_matches_uninterrupted_run(data, tmp_path):
    train, val = data
    full = train_image_tokenizer(TINY, FAST, train, val, tmp_path / "full", progress=False)

    def stop_at_5(entry):
        if entry["step"] >= 5:
            raise _Interrupt

    cfg = dataclasses.replace(FAST, log_every=1)
    with pytest.raises(_Interrupt):
        train_image_tokenizer(TINY, cfg, train, val, tmp_path / "cut", progress=False, on_log=stop_at_5)
    state = json.loads((tmp_path / "cut" / "checkpoint" / "state.json").read_text())
    assert state["step"] == 4  # the last checkpoint before the interruption
    resumed = train_image_tokenizer(TINY, cfg, train, val, tmp_path / "cut", resume=True, progress=False)
    assert resumed["steps"] == full["steps"] == 6
    a = ImageTokenizer.from_pretrained(tmp_path / "full").state_dict()
    b = ImageTokenizer.from_pretrained(tmp_path / "cut").state_dict()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6), k


def test_resume_without_checkpoint_is_clear(data, tmp_path):
    train, val = data
    with pytest.raises(FileNotFoundError, match="--resume"):
        train_image_tokenizer(TINY, FAST, train, val, tmp_path, resume=True, progress=False)


def test_bad_training_images(data, tmp_path):
    _, val = data
    with pytest.raises(ValueError, match="uint8"):
        train_image_tokenizer(TINY, FAST, torch.zeros(4, 3, 16, 16), val, tmp_path, progress=False)
    with pytest.raises(ValueError, match=r"\[N,3,16,16\]"):
        train_image_tokenizer(TINY, FAST, torch.zeros(4, 3, 32, 32, dtype=torch.uint8), val, tmp_path, progress=False)


def test_time_budget_stops_early(data, tmp_path):
    train, val = data
    m = train_image_tokenizer(TINY, dataclasses.replace(FAST, steps=1000, max_seconds=0.0), train, val, tmp_path,
                              progress=False)
    assert m["steps"] == 0
    assert (tmp_path / "model.safetensors").is_file()


def test_adversarial_loss_runs(data, tmp_path):
    train, val = data
    logs = []
    cfg = dataclasses.replace(FAST, steps=2, log_every=1, adversarial_weight=0.5, adversarial_start=1)
    train_image_tokenizer(TINY, cfg, train, val, tmp_path, progress=False, on_log=logs.append)
    assert "d" not in logs[0] and "d" in logs[1] and "g" in logs[1]
    assert (tmp_path / "checkpoint" / "discriminator.safetensors").is_file()
    assert PatchDiscriminator(n_layers=2)(torch.zeros(1, 3, 32, 32)).ndim == 4


# ---- LPIPS -------------------------------------------------------------------------
def _write_lpips_files(tmp_path):
    torch.manual_seed(0)
    ref = LPIPS()
    vgg = {f"features.{k}": v for k, v in ref.features.state_dict().items()}
    vgg["classifier.0.weight"] = torch.zeros(2, 2)  # torchvision files also hold the classifier
    lins = {f"lin{k}": v.abs() for k, v in ref.lins.state_dict().items()}
    torch.save(vgg, tmp_path / "vgg16.pth")
    torch.save(lins, tmp_path / "vgg.pth")
    return ref


def test_lpips_loads_local_weights(tmp_path):
    _write_lpips_files(tmp_path)
    lp = load_lpips(tmp_path / "vgg16.pth", tmp_path / "vgg.pth")
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    d_same = lp(x, x)
    d_diff = lp(x, -x)
    assert torch.allclose(d_same, torch.zeros(2), atol=1e-6)
    assert (d_diff > 0).all()


def test_lpips_not_supplied_is_clear(tmp_path):
    with pytest.raises(ValueError, match="not supplied"):
        load_lpips(None, None)
    with pytest.raises(ValueError, match="lpips_vgg_path"):
        VQTrainConfig(perceptual_weight=1.0)
    with pytest.raises(FileNotFoundError):
        load_lpips(tmp_path / "a.pth", tmp_path / "b.pth")


def test_training_with_perceptual_loss(data, tmp_path):
    _write_lpips_files(tmp_path)
    train, val = data
    logs = []
    cfg = dataclasses.replace(FAST, steps=1, log_every=1, perceptual_weight=0.1,
                              lpips_vgg_path=str(tmp_path / "vgg16.pth"), lpips_lin_path=str(tmp_path / "vgg.pth"))
    train_image_tokenizer(TINY, cfg, train, val, tmp_path / "run", progress=False, on_log=logs.append)
    assert "lpips" in logs[0]


# ---- CLI ---------------------------------------------------------------------------
def _folder_source(tmp_path, n: int):
    d = tmp_path / "imgs"
    d.mkdir()
    lines = []
    for i, im in enumerate(_pil_shapes(n, size=32)):
        im.save(d / f"{i}.png")
        lines.append(json.dumps({"file": f"{i}.png", "text": f"a shape number {i} <break>"}))
    (d / "captions.jsonl").write_text("\n".join(lines) + "\n")
    return d


def test_cli_train_text_and_image(tmp_path, monkeypatch):
    from cm3leon.cli import main
    from cm3leon.tokenize import image_vq_train
    from cm3leon.tokenize.text_bpe import TextTokenizer

    src = _folder_source(tmp_path, 12)
    assert main(["tokenizer", "train-text", "--data", str(src), "--vocab-size", "270",
                 "--out", str(tmp_path / "t")]) == 0
    tok = TextTokenizer.load(tmp_path / "t")
    assert tok.decode(tok.encode("a shape <break>")) == "a shape <break>"

    tiny32 = dataclasses.replace(TINY, resolution=32)
    monkeypatch.setitem(image_vq_train.TRAIN_PRESETS, "tiny-test", FAST)
    monkeypatch.setattr(VQConfig, "from_name", classmethod(lambda cls, name, **kw: tiny32))
    rc = main(["tokenizer", "train-image", "--data", str(src), "--preset", "tiny-test", "--out", str(tmp_path / "i"),
               "--steps", "2", "--n-val", "4"])
    assert rc == 0
    m = json.loads((tmp_path / "i" / "metrics.json").read_text())
    assert m["steps"] == 2 and m["val_n_images"] == 4 and m["n_train_images"] == 8


def test_cli_errors(tmp_path, capsys):
    from cm3leon.cli import main

    assert main(["tokenizer", "train-image", "--data", str(tmp_path), "--preset", "nope", "--out", str(tmp_path)]) == 1
    assert "unknown preset" in capsys.readouterr().err
    assert main(["tokenizer", "convert", "--ckpt", str(tmp_path / "x.ckpt"), "--config", str(tmp_path / "c.yaml"),
                 "--out", str(tmp_path / "o")]) == 1
    assert "not found" in capsys.readouterr().err

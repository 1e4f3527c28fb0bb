"""Training of the image tokenizer (VQ-GAN).

Loss = ``l1 * |x - x^| + l2 * (x - x^)^2 + codebook * (codebook + beta * commitment)``
[+ ``perceptual * LPIPS``] [+ ``adversarial * adaptive_weight * hinge-GAN`` after a warm-up].
AdamW with linear warm-up and cosine decay; dead codes are re-initialized from recent
encoder outputs; codebook usage and perplexity are logged. The output directory holds:

* ``config.json`` + ``model.safetensors``: the trained tokenizer (``ImageTokenizer.from_pretrained``);
* ``checkpoint/``: model, optimizer and step for ``--resume`` (safetensors + JSON, atomic);
* ``samples/step_NNNNNN.png``: grids of ``original | reconstruction`` pairs;
* ``metrics.json``: held-out PSNR, codebook usage and perplexity, steps, wall time;
* ``log.jsonl``: the periodic training log.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from cm3leon.pixels import pixels_to_unit, unit_to_pixels
from cm3leon.safetensors_io import read_safetensors
from cm3leon.tokenize.image_vq import ImageTokenizer, VQConfig, load_state_dict_strict
from cm3leon.tokenize.image_vq_quantizer import codebook_stats

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class VQTrainConfig:
    """Optimization knobs of image tokenizer training."""

    steps: int = 2000
    batch_size: int = 32
    lr: float = 2e-3
    warmup_steps: int = 50
    min_lr_ratio: float = 0.05  # cosine decays to lr * min_lr_ratio
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.99)
    grad_clip: float = 1.0
    l1_weight: float = 1.0
    l2_weight: float = 1.0
    codebook_weight: float = 1.0
    # Score what decode() returns: losses see the output clamped to [-1, 1] with a
    # straight-through gradient, so saturated colours (white, pure channels) need no precision.
    loss_on_clamped: bool = True
    perceptual_weight: float = 0.0  # needs lpips_vgg_path + lpips_lin_path
    lpips_vgg_path: str | None = None
    lpips_lin_path: str | None = None
    adversarial_weight: float = 0.0  # 0 = no discriminator
    adversarial_start: int = 0  # step at which the GAN loss switches on
    disc_lr: float = 2e-4
    restart_every: int = 25  # dead-code restart period in steps (0 = off)
    restart_threshold: float = 0.03  # a code is dead when its running count per batch is below this
    restart_sampling: str = "uniform"  # "uniform" | "error" (see VectorQuantizer.restart_dead_codes)
    usage_decay: float = 0.9  # decay of the running per-batch code counts
    hflip: bool = True  # random horizontal flips
    log_every: int = 50
    sample_every: int = 500
    checkpoint_every: int = 500
    eval_batch_size: int = 128
    seed: int = 0
    max_seconds: float | None = None  # stop early (and finish cleanly) after this much training time
    bf16: bool = False  # bf16 autocast for the encoder (quantizer and decoder stay fp32); for GPUs
    num_threads: int | None = None  # torch CPU threads while training (restored after); 1 on a shared CPU

    def __post_init__(self) -> None:
        object.__setattr__(self, "betas", tuple(self.betas))
        if self.steps <= 0 or self.batch_size <= 0:
            raise ValueError("steps and batch_size must be positive")
        if self.perceptual_weight > 0 and not (self.lpips_vgg_path and self.lpips_lin_path):
            raise ValueError(
                "perceptual_weight > 0 needs local LPIPS weights: set lpips_vgg_path (torchvision VGG16) and "
                "lpips_lin_path (lpips vgg.pth); nothing is downloaded"
            )

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["betas"] = list(self.betas)
        return d


# Presets pair a model shape (VQ_PRESETS) with training settings of the same name.
TRAIN_PRESETS: dict[str, VQTrainConfig] = {
    # Small batches: on a CPU, more steps beat more images per step for this model size.
    "shapes-32": VQTrainConfig(steps=2400, batch_size=8, lr=2e-3, log_every=100, sample_every=600,
                               checkpoint_every=600, restart_sampling="error"),
    # The larger CPU presets: about 5 minutes each on one shared core (docs/tokenizers.md).
    "shapes-64": VQTrainConfig(steps=1200, batch_size=8, lr=2e-3, log_every=100, sample_every=400,
                               checkpoint_every=400, restart_sampling="error"),
    "shapes-128": VQTrainConfig(steps=500, batch_size=8, lr=2e-3, warmup_steps=25, log_every=50,
                                sample_every=250, checkpoint_every=250, restart_sampling="error"),
    "shapes-256": VQTrainConfig(steps=200, batch_size=8, lr=2e-3, warmup_steps=10, restart_every=10, log_every=20,
                                sample_every=100, checkpoint_every=100, restart_sampling="error"),
    "paper-256": VQTrainConfig(
        steps=200_000, batch_size=16, lr=2e-4, warmup_steps=1000, min_lr_ratio=0.1, adversarial_weight=0.1,
        adversarial_start=50_000, restart_every=0, sample_every=2000, checkpoint_every=2000,
    ),
}


# ---- metrics -----------------------------------------------------------------------
def psnr(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB of images in [-1, 1] (peak = full [0, 1] range)."""
    mse = ((x.float() - y.float()) / 2.0).pow(2).flatten(1).mean(1)
    return 10.0 * torch.log10(1.0 / mse.clamp_min(1e-10))


def clamp_straight_through(x: torch.Tensor) -> torch.Tensor:
    """``x`` clamped to [-1, 1] in the forward pass, identity in the backward pass."""
    return x + (x.clamp(-1.0, 1.0) - x).detach()


@torch.no_grad()
def evaluate(model: ImageTokenizer, images_u8: torch.Tensor, *, batch_size: int = 128,
             device: torch.device | str = "cpu") -> dict[str, float]:
    """Mean per-image PSNR and codebook usage/perplexity of ``model`` on uint8 images."""
    was_training = model.training
    model.eval()
    counts = torch.zeros(model.codebook_size, dtype=torch.float64)
    scores = []
    for i in range(0, len(images_u8), batch_size):
        x = pixels_to_unit(images_u8[i:i + batch_size].to(device))
        codes = model.encode(x)
        rec = model.decode(codes)
        # Score what a user gets back: the 8-bit image.
        rec = pixels_to_unit(unit_to_pixels(rec))
        scores.append(psnr(rec, x).cpu())
        counts += torch.bincount(codes.flatten().cpu(), minlength=model.codebook_size).double()
    model.train(was_training)
    s = torch.cat(scores) if scores else torch.zeros(0)
    stats = codebook_stats(counts)
    return {
        "psnr": float(s.mean()) if len(s) else float("nan"),
        "psnr_min": float(s.min()) if len(s) else float("nan"),
        "codebook_usage": stats["usage"],
        "codebook_perplexity": stats["perplexity"],
        "n_images": int(len(images_u8)),
    }


def save_grid(originals: torch.Tensor, recons: torch.Tensor, path: Path, *, per_row: int = 4) -> None:
    """PNG grid of ``original | reconstruction`` pairs, ``per_row`` pairs per row."""
    o, r = originals[: per_row * 4], recons[: per_row * 4]
    n, _, h, w = o.shape
    rows = math.ceil(n / per_row)
    cell_w = 2 * w + 1 + 4  # original, 1 px gap, reconstruction, 4 px between pairs
    canvas = Image.new("RGB", (per_row * cell_w, rows * (h + 4)), (128, 128, 128))
    to_img = ImageTokenizer.postprocess
    for k, (a, b) in enumerate(zip(to_img(o), to_img(r))):
        row, col = divmod(k, per_row)
        x, y = col * cell_w, row * (h + 4)
        canvas.paste(a, (x, y))
        canvas.paste(b, (x + w + 1, y))
    tmp = path.with_name(path.name + ".tmp.png")
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(tmp)
    os.replace(tmp, path)


# ---- checkpoints -------------------------------------------------------------------
def _optimizer_tensors(opt: torch.optim.Optimizer, names: list[str]) -> tuple[dict[str, torch.Tensor], dict]:
    sd = opt.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    for idx, st in sd["state"].items():
        for k, v in st.items():
            t = v if isinstance(v, torch.Tensor) else torch.tensor(v)
            tensors[f"{names[idx]}::{k}"] = t.detach().cpu().contiguous()
    return tensors, {"param_groups": sd["param_groups"]}


def _load_optimizer(opt: torch.optim.Optimizer, names: list[str], tensors: dict[str, torch.Tensor], meta: dict) -> None:
    index = {n: i for i, n in enumerate(names)}
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, v in tensors.items():
        name, k = key.rsplit("::", 1)
        if name not in index:
            raise ValueError(f"optimizer checkpoint has state for unknown parameter {name!r}")
        state.setdefault(index[name], {})[k] = v
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def save_checkpoint(directory: Path, model: ImageTokenizer, opt: torch.optim.Optimizer, names: list[str],
                    step: int, extra: dict[str, Any]) -> None:
    """Atomically replace ``directory`` with model + optimizer + step; a failed write (disk full)
    raises :class:`~cm3leon.model.io.WriteError`, removes its temporary directory and keeps the old one."""
    from safetensors.torch import save_file

    from cm3leon.safetensors_io import reporting_write_errors, tensor_bytes

    tmp = directory.with_name(directory.name + ".tmp")
    old = directory.with_name(directory.name + ".old")
    shutil.rmtree(tmp, ignore_errors=True)
    opt_t, opt_meta = _optimizer_tensors(opt, names)
    needed = tensor_bytes(model.state_dict().values(), opt_t.values())
    try:
        with reporting_write_errors(f"the image tokenizer checkpoint {directory.name}", directory.parent, needed):
            tmp.mkdir(parents=True)
            model.save_pretrained(tmp)
            save_file(opt_t, str(tmp / "optimizer.safetensors"))
            (tmp / "state.json").write_text(json.dumps({"step": step, "optimizer": opt_meta, **extra}, indent=2))
            shutil.rmtree(old, ignore_errors=True)
            if directory.exists():
                os.replace(directory, old)
            os.replace(tmp, directory)
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if old.exists() and not directory.exists():  # the swap failed halfway: the previous one goes back
            os.replace(old, directory)


def load_checkpoint(directory: Path, model: ImageTokenizer, opt: torch.optim.Optimizer, names: list[str]) -> dict:
    """Restore model + optimizer from :func:`save_checkpoint`; returns the state dict (with ``step``)."""
    state_path = directory / "state.json"
    if not state_path.is_file():
        raise FileNotFoundError(f"no checkpoint to resume from: {state_path} not found (drop --resume)")
    state = json.loads(state_path.read_text())
    from cm3leon.tokenize.image_vq import load_vq_config

    cfg = load_vq_config(directory / "config.json")
    if cfg != model.cfg:
        raise ValueError(f"checkpoint {directory} was trained with a different model config: {cfg} vs {model.cfg}")
    load_state_dict_strict(model, read_safetensors(directory / "model.safetensors"), source=str(directory))
    _load_optimizer(opt, names, read_safetensors(directory / "optimizer.safetensors"), state["optimizer"])
    return state


# ---- the loop ----------------------------------------------------------------------
def lr_at(step: int, cfg: VQTrainConfig) -> float:
    """Linear warm-up then cosine decay to ``lr * min_lr_ratio``."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    t = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))


def _batch(images_u8: torch.Tensor, step: int, cfg: VQTrainConfig, device: torch.device) -> torch.Tensor:
    # The batch depends only on (seed, step), so a resumed run sees the same data.
    g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
    idx = torch.randint(0, len(images_u8), (cfg.batch_size,), generator=g)
    x = pixels_to_unit(images_u8[idx])
    if cfg.hflip:
        flip = torch.rand(cfg.batch_size, generator=g) < 0.5
        x[flip] = x[flip].flip(-1)
    return x.to(device)


def train_image_tokenizer(
    model_cfg: VQConfig,
    cfg: VQTrainConfig,
    train_images: torch.Tensor,
    val_images: torch.Tensor,
    out_dir: str | Path,
    *,
    resume: bool = False,
    device: str | torch.device = "cpu",
    progress: bool = True,
    on_log: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Train a tokenizer on uint8 images ``[N,3,R,R]``, evaluate on ``val_images``; returns metrics.

    Writes the trained tokenizer, checkpoints, sample grids and ``metrics.json`` into ``out_dir``.
    """
    out = Path(out_dir)
    r = model_cfg.resolution
    for name, imgs in (("train_images", train_images), ("val_images", val_images)):
        if imgs.dtype != torch.uint8 or imgs.ndim != 4 or tuple(imgs.shape[1:]) != (3, r, r):
            raise ValueError(f"{name} must be uint8 [N,3,{r},{r}], got {imgs.dtype} {tuple(imgs.shape)}")
    if len(train_images) == 0:
        raise ValueError("no training images")
    device = torch.device(device)
    threads_before = torch.get_num_threads()
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    try:
        return _train(model_cfg, cfg, train_images, val_images, out, resume=resume, device=device,
                      progress=progress, on_log=on_log)
    finally:
        torch.set_num_threads(threads_before)


def _train(model_cfg: VQConfig, cfg: VQTrainConfig, train_images: torch.Tensor, val_images: torch.Tensor,
           out: Path, *, resume: bool, device: torch.device, progress: bool,
           on_log: Callable[[dict[str, Any]], None] | None) -> dict[str, Any]:
    r = model_cfg.resolution
    torch.manual_seed(cfg.seed)
    model = ImageTokenizer(model_cfg).to(device).train()
    model.quantize.usage_decay = cfg.usage_decay
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    decayed = [(n, p) for n, p in named if p.ndim >= 2 and "embedding" not in n]  # conv kernels only
    rest = [(n, p) for n, p in named if not (p.ndim >= 2 and "embedding" not in n)]
    opt = torch.optim.AdamW(
        [{"params": [p for _, p in decayed], "weight_decay": cfg.weight_decay},
         {"params": [p for _, p in rest], "weight_decay": 0.0}],
        lr=cfg.lr, betas=cfg.betas, fused=device.type in ("cpu", "cuda"),
    )
    names = [n for n, _ in decayed + rest]  # optimizer state index -> parameter name

    lpips = None
    if cfg.perceptual_weight > 0:
        from cm3leon.tokenize.image_vq_losses import load_lpips

        lpips = load_lpips(cfg.lpips_vgg_path, cfg.lpips_lin_path).to(device)
    disc = disc_opt = None
    if cfg.adversarial_weight > 0:
        from cm3leon.tokenize.image_vq_losses import PatchDiscriminator

        disc = PatchDiscriminator(model_cfg.out_channels, n_layers=2 if r <= 64 else 3).to(device)
        disc_opt = torch.optim.AdamW(disc.parameters(), lr=cfg.disc_lr, betas=(0.5, 0.9))

    ckpt_dir = out / "checkpoint"
    start, train_seconds = 0, 0.0
    if resume:
        state = load_checkpoint(ckpt_dir, model, opt, names)
        start, train_seconds = int(state["step"]), float(state.get("train_seconds", 0.0))
        if disc is not None and (ckpt_dir / "discriminator.safetensors").is_file():
            load_state_dict_strict(disc, read_safetensors(ckpt_dir / "discriminator.safetensors"), source="disc")
        logger.info("resumed from %s at step %d", ckpt_dir, start)
    out.mkdir(parents=True, exist_ok=True)
    (out / "train_config.json").write_text(json.dumps({"model": model_cfg.to_dict(), "train": cfg.to_dict()}, indent=2))

    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=cfg.steps, initial=start, unit="step", desc="vq", dynamic_ncols=True)
    window_counts = torch.zeros(model_cfg.codebook_size)
    window_loss: dict[str, float] = {}
    recent: torch.Tensor | None = None
    gen = torch.Generator().manual_seed(cfg.seed + 17)
    log_f = open(out / "log.jsonl", "a")  # noqa: SIM115 - closed in finally
    t_last = time.perf_counter()
    cpu_start = time.process_time()
    done = start
    try:
        for step in range(start, cfg.steps):
            if cfg.max_seconds is not None and train_seconds >= cfg.max_seconds:
                logger.info("time budget of %.0fs reached at step %d", cfg.max_seconds, step)
                break
            for gr in opt.param_groups:
                gr["lr"] = lr_at(step, cfg)
            x = _batch(train_images, step, cfg, device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.bf16):
                res = model(x)
            rec = res.recon
            if cfg.loss_on_clamped:
                rec = clamp_straight_through(rec)
            l1 = (rec - x).abs().mean()
            l2 = (rec - x).pow(2).mean()
            loss = cfg.l1_weight * l1 + cfg.l2_weight * l2 + cfg.codebook_weight * res.quant.loss
            parts = {"l1": l1.item(), "l2": l2.item(), "vq": res.quant.loss.item()}
            if lpips is not None:
                p = lpips(rec, x).mean()
                loss = loss + cfg.perceptual_weight * p
                parts["lpips"] = p.item()
            gan_on = disc is not None and step >= cfg.adversarial_start
            if gan_on:
                g_loss = -disc(rec).mean()
                w = adaptive_weight(loss, g_loss, model)
                loss = loss + cfg.adversarial_weight * w * g_loss
                parts["g"] = g_loss.item()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            if gan_on:
                d_loss = _disc_step(disc, disc_opt, x, rec.detach())
                parts["d"] = d_loss

            window_counts += res.quant.counts.cpu()
            for k, v in parts.items():
                window_loss[k] = window_loss.get(k, 0.0) + v
            latents = res.quant.latents
            recent = latents if recent is None else torch.cat([latents, recent])[: 8 * latents.shape[0]]
            if cfg.restart_every and (step + 1) % cfg.restart_every == 0:
                n_dead = model.quantize.restart_dead_codes(recent, threshold=cfg.restart_threshold, generator=gen,
                                                               sampling=cfg.restart_sampling)
                if n_dead:
                    logger.debug("step %d: restarted %d dead codes", step + 1, n_dead)

            now = time.perf_counter()
            train_seconds += now - t_last
            t_last = now
            done = step + 1
            if bar is not None:
                bar.update(1)
            if done % cfg.log_every == 0 or done == cfg.steps:
                n = cfg.log_every if done % cfg.log_every == 0 else (done % cfg.log_every)
                stats = codebook_stats(window_counts)
                rec_entry = {"step": done, "lr": lr_at(step, cfg), "seconds": round(train_seconds, 2),
                             **{k: v / n for k, v in window_loss.items()},
                             "psnr_batch": float(psnr(rec.detach().clamp(-1, 1), x).mean()),
                             "usage": stats["usage"], "perplexity": stats["perplexity"]}
                log_f.write(json.dumps(rec_entry) + "\n")
                log_f.flush()
                if bar is not None:
                    bar.set_postfix(loss=f"{rec_entry['l1']:.4f}", psnr=f"{rec_entry['psnr_batch']:.1f}",
                                    usage=f"{stats['usage']:.2f}", ppl=f"{stats['perplexity']:.0f}")
                logger.debug("%s", rec_entry)
                if on_log is not None:
                    on_log(rec_entry)
                window_counts.zero_()
                window_loss = {}
            if cfg.sample_every and done % cfg.sample_every == 0:
                _write_samples(model, val_images, out / "samples" / f"step_{done:06d}.png", device)
            if cfg.checkpoint_every and done % cfg.checkpoint_every == 0 and done < cfg.steps:
                _checkpoint(ckpt_dir, model, opt, names, done, train_seconds, disc)
                t_last = time.perf_counter()  # checkpoint I/O is not training time
    finally:
        log_f.close()
        if bar is not None:
            bar.close()

    model.eval()
    _checkpoint(ckpt_dir, model, opt, names, done, train_seconds, disc)
    from cm3leon.safetensors_io import reporting_write_errors, tensor_bytes

    with reporting_write_errors("the image tokenizer", out, tensor_bytes(model.state_dict().values())):
        model.save_pretrained(out)
    _write_samples(model, val_images, out / "samples" / "final.png", device)
    metrics = {
        "steps": done,
        "train_seconds": round(train_seconds, 2),
        "train_cpu_seconds_this_run": round(time.process_time() - cpu_start, 2),
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
        "n_train_images": int(len(train_images)),
        "tokens_per_image": model_cfg.tokens_per_image,
        "codebook_size": model_cfg.codebook_size,
        **{f"val_{k}": v
           for k, v in evaluate(model, val_images, batch_size=cfg.eval_batch_size, device=device).items()},
    }
    tmp = out / "metrics.json.tmp"
    tmp.write_text(json.dumps(metrics, indent=2) + "\n")
    os.replace(tmp, out / "metrics.json")
    logger.info("image tokenizer: held-out PSNR %.2f dB, codebook usage %.1f%%, %.0fs",
                metrics["val_psnr"], 100 * metrics["val_codebook_usage"], train_seconds)
    return metrics


def adaptive_weight(rec_loss: torch.Tensor, g_loss: torch.Tensor, model: ImageTokenizer) -> torch.Tensor:
    """taming's GAN weight, measured at the decoder's last conv."""
    from cm3leon.tokenize.image_vq_losses import adaptive_gan_weight

    return adaptive_gan_weight(rec_loss, g_loss, model.decoder.conv_out.weight)


def _disc_step(disc: torch.nn.Module, opt: torch.optim.Optimizer, real: torch.Tensor, fake: torch.Tensor) -> float:
    from cm3leon.tokenize.image_vq_losses import hinge_d_loss

    loss = hinge_d_loss(disc(real), disc(fake))
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss.item()


def _checkpoint(ckpt_dir: Path, model: ImageTokenizer, opt: torch.optim.Optimizer, names: list[str], step: int,
                train_seconds: float, disc: torch.nn.Module | None) -> None:
    save_checkpoint(ckpt_dir, model, opt, names, step, {"train_seconds": train_seconds})
    if disc is not None:
        from cm3leon.safetensors_io import write_safetensors

        write_safetensors({k: v.detach().cpu().contiguous() for k, v in disc.state_dict().items()},
                          ckpt_dir / "discriminator.safetensors", what="the discriminator weights")


@torch.no_grad()
def _write_samples(model: ImageTokenizer, images_u8: torch.Tensor, path: Path, device: torch.device) -> None:
    if len(images_u8) == 0:
        return
    was = model.training
    model.eval()
    x = pixels_to_unit(images_u8[:16].to(device))
    save_grid(x.cpu(), model.decode(model.encode(x)).cpu(), path)
    model.train(was)

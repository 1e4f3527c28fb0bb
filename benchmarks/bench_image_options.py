"""Cost of the image-place options (ModelConfig.image_copy_bias, image_rope_dims) in training
and decoding, against the same model without them, in one process.

Rows are the quickstart's: text, then images of ``--image-tokens`` ids each, so the copy
bias has pairs to score (every image after the first links to the earlier ones). Training:
fwd + bwd + AdamW steps, variants interleaved (rotating which goes first), medians.
Decoding: prefill a prompt with one image, then decode ``--decode`` tokens with the KV
cache (one image), ms per token, medians over repeats. Prints ONE JSON line.

    python benchmarks/bench_image_options.py                 # CPU, quickstart model, batch 16 x 320
    python benchmarks/bench_image_options.py --threads 2 --steps 8
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time

import torch
import torch.nn.functional as F

from cm3leon.config import ModelConfig
from cm3leon.model.kv_cache import KVCache, decode_one_token, prefill
from cm3leon.model.transformer import Transformer


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=320)
    p.add_argument("--image-tokens", type=int, default=64)
    p.add_argument("--steps", type=int, default=6, help="timed training steps per variant")
    p.add_argument("--decode", type=int, default=64, help="tokens decoded per repeat")
    p.add_argument("--repeats", type=int, default=5, help="timed decoding repeats per variant")
    p.add_argument("--decode-batch", type=int, default=8)
    p.add_argument("--threads", type=int, default=None)
    return p.parse_args()


def variants(args: argparse.Namespace) -> dict[str, ModelConfig]:
    base = ModelConfig(vocab_size=1600, d_model=128, n_layers=4, n_heads=4, max_seq_len=max(args.seq, 128),
                       image_tokens=args.image_tokens, image_vocab=1024, image_axial=True)
    return {"base": base, "copy_bias": dataclasses.replace(base, image_copy_bias=True),
            "rope16": dataclasses.replace(base, image_rope_dims=16)}


def rows(cfg: ModelConfig, batch: int, seq: int, gen: torch.Generator) -> torch.Tensor:
    """Long[B, seq]: 16 text ids, then images of image_tokens ids separated by one text id."""
    first_image = cfg.vocab_size - cfg.image_vocab
    ids = torch.randint(0, first_image, (batch, seq), generator=gen)
    t, n = 16, cfg.image_tokens
    while t + n <= seq:
        ids[:, t : t + n] = torch.randint(first_image, cfg.vocab_size, (batch, n), generator=gen)
        t += n + 1
    return ids


def time_training(models: dict[str, Transformer], ids: torch.Tensor, steps: int) -> dict[str, float]:
    opts = {k: torch.optim.AdamW(m.parameters(), lr=1e-4) for k, m in models.items()}
    times: dict[str, list[float]] = {k: [] for k in models}
    names = list(models)
    for s in range(steps + 1):  # step 0 warms up
        order = names[s % len(names):] + names[: s % len(names)]
        for k in order:
            t0 = time.perf_counter()
            logits = models[k](ids[:, :-1])
            F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)).backward()
            opts[k].step()
            opts[k].zero_grad(set_to_none=True)
            if s:
                times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


@torch.no_grad()
def time_decoding(models: dict[str, Transformer], prompt: torch.Tensor, n: int, repeats: int) -> dict[str, float]:
    times: dict[str, list[float]] = {k: [] for k in models}
    first_image = next(iter(models.values())).first_image_id
    for r in range(repeats + 1):
        for k, m in models.items():
            cache = KVCache.allocate(m.cfg, prompt.shape[0], prompt.shape[1] + n)
            logits = prefill(m, prompt, torch.ones_like(prompt, dtype=torch.bool), cache)[:, -1]
            t0 = time.perf_counter()
            for _ in range(n):
                nxt = logits[:, first_image:].argmax(-1, keepdim=True) + first_image
                logits = decode_one_token(m, nxt, cache)
            if r:
                times[k].append((time.perf_counter() - t0) / n * 1e3)
    return {k: statistics.median(v) for k, v in times.items()}


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    cfgs = variants(args)
    models = {}
    for k, cfg in cfgs.items():
        torch.manual_seed(0)
        models[k] = Transformer(cfg).to(args.device).train()
        for name, p in models[k].named_parameters():
            if name.endswith("copy_bias"):
                torch.nn.init.normal_(p)  # a trained-looking bias (zero would still pay the cost)
    base_cfg = cfgs["base"]
    ids = rows(base_cfg, args.batch, args.seq + 1, gen).to(args.device)
    train_s = time_training(models, ids, args.steps)
    for m in models.values():
        m.eval()
    prompt = rows(base_cfg, args.decode_batch, 16 + base_cfg.image_tokens + 1, gen).to(args.device)
    decode_ms = time_decoding(models, prompt, args.decode, args.repeats)
    out = {
        "bench": "image_options", "device": args.device, "threads": torch.get_num_threads(),
        "batch": args.batch, "seq": args.seq, "image_tokens": args.image_tokens,
        "train_step_s": {k: round(v, 4) for k, v in train_s.items()},
        "train_ratio_vs_base": {k: round(v / train_s["base"], 3) for k, v in train_s.items()},
        "decode_ms_per_token": {k: round(v, 3) for k, v in decode_ms.items()},
        "decode_ratio_vs_base": {k: round(v / decode_ms["base"], 3) for k, v in decode_ms.items()},
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()

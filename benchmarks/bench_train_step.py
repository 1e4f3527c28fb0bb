"""Where a quickstart training step's time goes on the CPU, and what torch.compile buys.

Builds the quickstart decoder (recipe ``quickstart``: 4 layers, d 128, place-in-image and
row/column embeddings) with the quickstart's vocabulary size, and times full training steps
(forward, loss, backward, gradient clipping, fused AdamW) on random ids laid out like the
training rows (caption text, then 64-token images). Variants run interleaved in the same
process: ``eager`` fp32 (the baseline), ``compile`` (each block ``torch.compile``d, the
recipe option ``train.compile``) and ``bf16`` (CPU autocast, what ``precision=auto`` picks on
a CPU with native bf16 matrix products). Prints the profiler's top operators of the eager and
bf16 steps to stderr and ONE JSON line of medians and ratios to stdout.

    python benchmarks/bench_train_step.py                 # SFT shape: 16 x 320
    python benchmarks/bench_train_step.py --batch 4       # pretraining shape: 4 x 320
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from typing import Any

import torch

from cm3leon.config import ModelConfig
from cm3leon.model.transformer import Transformer
from cm3leon.train.config import TrainConfig
from cm3leon.train.loop import build_optimizer, lm_loss_sum
from cm3leon.train.parallelize import apply_compile
from cm3leon.train.recipes import get_recipe


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=320)
    p.add_argument("--vocab", type=int, default=1046, help="quickstart vocabulary: 512 text BPE + 512 codes + controls")
    p.add_argument("--steps", type=int, default=12, help="timed steps per variant")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--variants", default="eager,compile,bf16")
    p.add_argument("--threads", type=int, default=None)
    return p.parse_args()


def make_batch(batch: int, seq: int, vocab: int, image_vocab: int, gen: torch.Generator) -> torch.Tensor:
    """Rows of 3 documents: a 30-token caption then a 64-token image, repeated to ``seq``."""
    first_image = vocab - image_vocab
    ids = torch.randint(0, first_image, (batch, seq), generator=gen)
    doc = 30 + 64
    for start in range(0, seq, doc):
        a, b = start + 30, min(start + doc, seq)
        if a < b:
            ids[:, a:b] = torch.randint(first_image, vocab, (batch, b - a), generator=gen)
    return ids


def build(cfg: ModelConfig, variant: str) -> tuple[Transformer, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = Transformer(cfg).train()
    if variant == "compile":
        apply_compile(model)
    return model, build_optimizer(model, TrainConfig(), torch.device("cpu"))


def step(model: Transformer, optim: torch.optim.Optimizer, ids: torch.Tensor, bf16: bool) -> float:
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    with ctx:
        logits = model(ids)
    loss = lm_loss_sum(logits, ids) / ids.numel()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optim.step()
    optim.zero_grad(set_to_none=True)
    return float(loss.detach())


def profile_table(model: Transformer, optim: torch.optim.Optimizer, ids: torch.Tensor,
                  bf16: bool) -> list[dict[str, Any]]:
    """Self-CPU share of the top operators over 4 steps."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(4):
            step(model, optim, ids, bf16)
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    top = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:12]
    return [{"op": e.key, "share": round(e.self_cpu_time_total / total, 3)} for e in top]


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    over = dict(get_recipe("quickstart").model_overrides)
    cfg = ModelConfig.from_name("shapes", vocab_size=args.vocab, **over)
    gen = torch.Generator().manual_seed(0)
    batches = [make_batch(args.batch, args.seq, args.vocab, cfg.image_vocab, gen) for _ in range(4)]
    variants = args.variants.split(",")
    built: dict[str, tuple[Transformer, torch.optim.Optimizer]] = {}
    first_step: dict[str, float] = {}
    for v in variants:
        built[v] = build(cfg, v)
        t0 = time.perf_counter()
        for i in range(args.warmup):
            step(*built[v], batches[i % 4], v == "bf16")
        first_step[v] = time.perf_counter() - t0  # includes compilation for "compile"
    times: dict[str, list[float]] = {v: [] for v in variants}
    for i in range(args.steps):
        for v in (variants if i % 2 == 0 else variants[::-1]):
            t0 = time.perf_counter()
            step(*built[v], batches[i % 4], v == "bf16")
            times[v].append(time.perf_counter() - t0)
    for v in ("eager", "bf16"):
        if v in built:
            print(f"-- {v}: self-CPU share of the top operators", file=sys.stderr)
            for row in profile_table(*built[v], batches[0], v == "bf16"):
                print(f"{row['share']:6.1%}  {row['op']}", file=sys.stderr)
    med = {v: statistics.median(t) for v, t in times.items()}
    tokens = args.batch * args.seq
    out: dict[str, Any] = {"batch": args.batch, "seq": args.seq, "threads": torch.get_num_threads(),
                           "params": sum(p.numel() for p in built[variants[0]][0].parameters())}
    for v in variants:
        out[f"{v}_step_ms"] = round(med[v] * 1e3, 2)
        out[f"{v}_tokens_per_s"] = round(tokens / med[v])
        out[f"{v}_warmup_s"] = round(first_step[v], 1)
        if "eager" in med and v != "eager":
            out[f"{v}_speedup_vs_eager"] = round(med["eager"] / med[v], 3)
    print(json.dumps(out))


if __name__ == "__main__":
    main()

"""LoRA vs full fine-tuning: training tokens/s and peak memory for one model shape. Prints ONE JSON line.

Each mode runs in its own process (so peak memory is its own): ``full`` trains every parameter
(float32 master weights, AdamW), ``lora`` trains adapters on the frozen base
(``cm3leon.train.lora.attach_lora``; bf16 base with ``--bf16``). Same random batches, loss and
optimizer as ``cm3leon sft``. Peak memory: ``torch.cuda.max_memory_allocated`` on CUDA, the
process's peak RSS growth over its RSS before the model was built on the CPU (one malloc arena,
trimmed at once). Next to each the
memory plan's estimate (``cm3leon.train.memory``).

    python benchmarks/bench_lora.py                                   # CPU, tiny shape
    python benchmarks/bench_lora.py --shape 256,6,8,1024,8192 --seq 256
    python benchmarks/bench_lora.py --device cuda --preset 7b --seq 4096 --batch 1 --bf16 --ckpt
    python benchmarks/bench_lora.py --device cuda --preset chameleon-7b --seq 4096 --batch 1 --bf16 --ckpt
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch

from cm3leon.config import ModelConfig
from cm3leon.train.lora import LoraSpec, attach_lora, count_trainable
from cm3leon.train.memory import ModelShape, memory_plan

PRESETS = {  # name -> ModelConfig fields (vocab_size included)
    "tiny": dict(vocab_size=1024, d_model=64, n_layers=2, n_heads=4, max_seq_len=512),
    "7b": dict(vocab_size=65536, d_model=4096, n_layers=32, n_heads=32, max_seq_len=4096),
    "chameleon-7b": dict(vocab_size=65536, d_model=4096, n_layers=32, n_heads=32, d_ff=11008, max_seq_len=4096,
                         family="chameleon", activation="silu"),
}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    p.add_argument("--shape", default=None, help="d_model,n_layers,n_heads,d_ff,vocab (overrides --preset)")
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=5, help="timed steps per mode")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--lora", default="r=16,alpha=32,targets=all-linear", help="the --lora spec")
    p.add_argument("--modes", default="full,lora")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast; LoRA's frozen base in bf16")
    p.add_argument("--ckpt", action="store_true", help="activation checkpointing")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    return p.parse_args()


def model_config(args: argparse.Namespace) -> ModelConfig:
    kw = dict(PRESETS[args.preset])
    if args.shape:
        d, n, h, f, v = (int(x) for x in args.shape.split(","))
        kw.update(d_model=d, n_layers=n, n_heads=h, d_ff=f, vocab_size=v)
    kw["max_seq_len"] = max(kw.get("max_seq_len", 512), args.seq)
    return ModelConfig(**kw)


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def run_mode(args: argparse.Namespace, mode: str) -> dict:
    """Train ``args.steps`` timed steps in ``mode`` (full | lora); tokens/s and peak memory."""
    import peft  # noqa: F401  (imported before the baseline RSS: its import is not the model's memory)

    from cm3leon.model.transformer import Transformer
    from cm3leon.train.config import TrainConfig
    from cm3leon.train.loop import build_optimizer, lm_loss_sum

    if args.threads:
        torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    cfg = model_config(args)
    spec = LoraSpec.parse(args.lora)
    rss0 = _rss_bytes()
    torch.manual_seed(0)
    with dev:
        model = Transformer(cfg)
    with torch.no_grad():
        model.lm_head.weight.normal_(0.0, 0.02)  # the zero-initialised head would pass no gradient
    if mode == "lora":
        attach_lora(model, spec, base_dtype=torch.bfloat16 if args.bf16 else None)
    model.gradient_checkpointing = args.ckpt
    model.train()
    optim = build_optimizer(model, TrainConfig(lr=1e-4), dev)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, cfg.vocab_size, (args.batch, args.seq), generator=g).to(dev)
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for i in range(args.warmup + args.steps):
        t0 = time.perf_counter()
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=args.bf16):
            logits = model(ids)
        loss = lm_loss_sum(logits, ids) / ids.numel()
        loss.backward()
        optim.step()
        optim.zero_grad(set_to_none=True)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
        del logits, loss
    if dev.type == "cuda":
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - rss0
    plan = memory_plan(ModelShape.from_config(cfg), seq_len=args.seq, micro_batch=args.batch,
                       lora=spec if mode == "lora" else None, activation_checkpointing=args.ckpt, bf16=args.bf16)
    step = statistics.median(times)
    return {"mode": mode, "step_s": round(step, 5), "tokens_per_s": round(args.batch * args.seq / step, 1),
            "peak_gb": round(peak / 1e9, 4), "plan_gb": round(plan.total / 1e9, 4),
            "trainable": count_trainable(model), "params": sum(p.numel() for p in model.parameters())}


def main() -> None:
    args = parse_args()
    if args.child:
        print(json.dumps(run_mode(args, args.child)))
        return
    res = {}
    for mode in args.modes.split(","):
        cmd = [sys.executable, __file__, *sys.argv[1:], "--child", mode]
        # One glibc arena that returns freed memory at once: the CPU peak RSS is then the tensors'
        # peak, not the allocator's retention (without it the same LoRA run reads ~2x the plan).
        env = {**os.environ, "MALLOC_ARENA_MAX": "1", "MALLOC_TRIM_THRESHOLD_": "0"}
        p = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if p.returncode != 0:
            tail = p.stderr.strip().splitlines()[-1:] or ["failed"]
            res[mode] = {"mode": mode, "error": "out of memory" if "OutOfMemory" in p.stderr else tail[0]}
            continue
        res[mode] = json.loads(p.stdout.strip().splitlines()[-1])
    out = {"bench": "lora", "device": args.device, "preset": args.preset, "shape": args.shape, "seq": args.seq,
           "batch": args.batch, "bf16": args.bf16, "activation_checkpointing": args.ckpt, "lora_spec": args.lora,
           "load_1min": round(os.getloadavg()[0], 2), **{m: r for m, r in res.items()}}
    full, lora = res.get("full", {}), res.get("lora", {})
    if "tokens_per_s" in full and "tokens_per_s" in lora:
        out["lora_vs_full_tokens_per_s"] = round(lora["tokens_per_s"] / full["tokens_per_s"], 3)
        out["lora_vs_full_peak_memory"] = round(lora["peak_gb"] / max(full["peak_gb"], 1e-9), 3)
    print(json.dumps(out))


if __name__ == "__main__":
    main()

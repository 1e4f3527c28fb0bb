"""Training throughput of our decoder vs transformers' OPTForCausalLM of identical shape.

Both models are built from the same ModelConfig (the OPT one through our exporter, so it
has the same weights), trained on the same batches with the same loss and AdamW, steps
interleaved (alternating which goes first), medians reported. Prints ONE JSON line.

    python benchmarks/bench_train_vs_opt.py                       # CPU, d=256, 6 layers, seq 512, batch 4
    python benchmarks/bench_train_vs_opt.py --device cuda --preset 350m --seq 4096 --bf16
On CUDA it also reports MFU (6 * N * tokens/s / peak FLOPs) and memory. On CPU it also
reports process CPU time per step, which a shared machine disturbs far less than wall time.
Baselines: OPT with transformers' default SDPA attention (same kernels as ours) and, on
CPU, OPT's classic "eager" attention (explicit softmax(QK^T)V).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time

import torch
import torch.nn.functional as F

from cm3leon.config import ModelConfig
from cm3leon.model.hf import to_hf
from cm3leon.model.transformer import Transformer
from cm3leon.vocab import Vocab


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--preset", default=None, help="ModelConfig preset (default: d=256, 6 layers, 8 heads)")
    p.add_argument("--vocab", type=int, default=None,
                   help="vocab size (default: 8192 on CPU, paper vocab with --preset)")
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=5, help="timed steps per model")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--bf16", action="store_true", help="bf16 autocast (mixed precision, fp32 master weights)")
    p.add_argument("--compile", action="store_true", help="torch.compile both models")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="accelerator dense peak (H100 bf16: 989)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument(
        "--baselines", default=None,
        help="comma list of OPT attention implementations to compare with: sdpa, eager "
        "(default: sdpa,eager on CPU; sdpa on CUDA, where eager attention at seq 4096 does not fit)",
    )
    return p.parse_args()


def model_config(args: argparse.Namespace) -> ModelConfig:
    if args.preset:
        vocab = args.vocab or Vocab.paper().size
        return ModelConfig.from_name(args.preset, vocab_size=vocab, max_seq_len=max(args.seq, 1))
    return ModelConfig(vocab_size=args.vocab or 8192, d_model=256, n_layers=6, n_heads=8, max_seq_len=args.seq)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_step(forward, params, device: torch.device, bf16: bool):
    """One fwd+bwd+AdamW step of next-token cross-entropy; returns (wall s, process CPU s)."""
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.1, fused=device.type == "cuda")

    def step(ids: torch.Tensor, targets: torch.Tensor) -> tuple[float, float]:
        ctx = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
        sync(device)
        t0, c0 = time.perf_counter(), time.process_time()
        with ctx:
            logits = forward(ids)
        loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync(device)
        return time.perf_counter() - t0, time.process_time() - c0

    return step, opt


def resident_bytes(model: torch.nn.Module, opt: torch.optim.Optimizer) -> int:
    """Parameters + optimizer state in bytes (gradients are freed by zero_grad)."""
    n = sum(p.numel() * p.element_size() for p in model.parameters())
    for state in opt.state.values():
        n += sum(v.numel() * v.element_size() for v in state.values() if torch.is_tensor(v))
    return n


def build_models(cfg: ModelConfig, device: torch.device, baselines: list[str], compile_: bool):
    """name -> (module, forward fn): ours plus one OPTForCausalLM per attention implementation."""
    torch.manual_seed(0)
    ours = Transformer(cfg).to(device).train()
    models = {"ours": (ours, ours)}
    for impl in baselines:
        hf = to_hf(ours).to(device).train()  # same shape and weights, no shared storage
        hf.config.use_cache = False
        hf.set_attn_implementation(impl)
        models[f"hf_{impl}"] = (hf, hf)
    out = {}
    for name, (module, fn) in models.items():
        fn = torch.compile(fn) if compile_ else fn
        if name == "ours":
            out[name] = (module, fn)
        else:
            out[name] = (module, lambda x, fn=fn: fn(input_ids=x, use_cache=False).logits)
    return out


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cfg = model_config(args)
    default = "sdpa,eager" if device.type == "cpu" else "sdpa"
    baselines = [b for b in (args.baselines or default).split(",") if b]
    if not set(baselines) <= {"sdpa", "eager"}:
        raise SystemExit(f"--baselines: unknown implementation in {baselines}; use sdpa and/or eager")
    models = build_models(cfg, device, baselines, args.compile)
    ours = models["ours"][0]
    n_params = ours.num_params()
    n_matmul = ours.num_params(non_embedding=True)  # weights used in matmuls (LM head included)
    steps = {}
    opts = {}
    for name, (module, fn) in models.items():
        steps[name], opts[name] = make_step(fn, module.parameters(), device, args.bf16)

    g = torch.Generator().manual_seed(1)
    batches = [
        torch.randint(0, cfg.vocab_size, (args.batch, args.seq + 1), generator=g).to(device)
        for _ in range(args.warmup + args.steps)
    ]
    names = list(models)
    wall: dict[str, list[float]] = {k: [] for k in names}
    cpu: dict[str, list[float]] = {k: [] for k in names}
    extra_peak = dict.fromkeys(names, 0)
    for i, b in enumerate(batches):
        ids, targets = b[:, :-1].contiguous(), b[:, 1:].contiguous()
        for name in names[i % len(names) :] + names[: i % len(names)]:  # rotate who goes first
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
                base = torch.cuda.memory_allocated(device)
            dt, dc = steps[name](ids, targets)
            if device.type == "cuda":
                extra_peak[name] = max(extra_peak[name], torch.cuda.max_memory_allocated(device) - base)
            if i >= args.warmup:
                wall[name].append(dt)
                cpu[name].append(dc)

    tokens = args.batch * args.seq
    tps = {k: tokens / statistics.median(v) for k, v in wall.items()}
    out = {
        "bench": "train_vs_opt",
        "device": str(device) if device.type != "cuda" else torch.cuda.get_device_name(device),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "preset": args.preset or "d256-l6",
        "d_model": cfg.d_model,
        "n_layers": cfg.n_layers,
        "vocab": cfg.vocab_size,
        "seq": args.seq,
        "batch": args.batch,
        "bf16": args.bf16,
        "compile": args.compile,
        "params_m": round(n_params / 1e6, 2),
        "steps": args.steps,
    }
    for k in names:
        out[f"{k}_tokens_per_s"] = round(tps[k], 1)
        out[f"{k}_step_s_median"] = round(statistics.median(wall[k]), 4)
    for k in names[1:]:
        out[f"ratio_ours_over_{k}"] = round(tps["ours"] / tps[k], 3)
    if device.type == "cpu":
        for k in names:
            out[f"{k}_cpu_s_median"] = round(statistics.median(cpu[k]), 4)
        for k in names[1:]:
            out[f"cpu_ratio_ours_over_{k}"] = round(statistics.median(cpu[k]) / statistics.median(cpu["ours"]), 3)
    if device.type == "cuda":
        peak = args.peak_tflops * 1e12
        attn_flops_per_token = 12 * cfg.n_layers * cfg.d_model * args.seq  # PaLM appendix B, causal not halved
        for k in names:
            out[f"{k}_mfu_6n"] = round(6 * n_matmul * tps[k] / peak, 4)
            out[f"{k}_mfu_with_attn"] = round((6 * n_matmul + attn_flops_per_token) * tps[k] / peak, 4)
            out[f"{k}_resident_gb"] = round(resident_bytes(models[k][0], opts[k]) / 2**30, 2)
            out[f"{k}_step_peak_extra_gb"] = round(extra_peak[k] / 2**30, 2)
        out["peak_tflops"] = args.peak_tflops
    print(json.dumps(out))


if __name__ == "__main__":
    main()

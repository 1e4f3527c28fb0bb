"""Image-token decoding speed with CFG: ours vs a no-KV-cache loop vs transformers generate().

One process, one set of random weights (non-zero LM head), the same prompts and the same
sampling (CFG scale 3, top-p 0.9, image-only modality mask) for the three decoders:

- ``ours``: :func:`cm3leon.generate.decode.generate_image_tokens` ([cond; uncond] in one
  batch over the static KV cache);
- ``naive``: the same batch and the same sampling ops, but every step re-runs the full
  forward over all tokens so far (no KV cache);
- ``hf``: ``OPTForCausalLM.generate()`` on the exported weights (``model/hf.py``) with its
  own CFG (``guidance_scale`` + ``negative_prompt_ids``, i.e.
  ``UnbatchedClassifierFreeGuidanceLogitsProcessor``, which runs the unconditional batch
  as a second cached forward), ``top_p=0.9, top_k=0`` and an image-only logits processor;
- ``fused``: ours with every eager 1-token step run by a hand-fused function (plain
  functional calls on the weights, no module calls, no q/k/v head transposes) instead of
  ``Transformer.forward_cached``: ``speedup_vs_fused`` (fused time / ours) says what
  keeping such a second decode path in the model would buy.

HF runs its default (and best) attention here, SDPA (``hf_attn_implementation`` in the output).

Prints ONE JSON line: median seconds per batch (``--repeats`` runs; one for ``naive``),
image tokens/s and speed-up ratios, plus a greedy agreement check (fraction of identical
tokens, ours vs each baseline: 1.0 means the three decoders do the same computation).

CPU default: ``shapes``-shaped model, L=64, 8 prompts, 1 torch thread (~1.5 min on a
busy 2-core machine); ``--preset tiny`` for the overhead-bound regime, ``--shape 128,4,4
--baselines fused`` for the quickstart model's fused-step check.
GPU: ``--device cuda --preset 350m`` decodes 1024-token images for 16 prompts with CFG in
bf16 and also reports the memory-bandwidth bound (weight bytes / HBM bandwidth x steps;
``--hbm-tbps``, default 3.35 for H100 SXM) and our time's ratio to it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F

from cm3leon.config import ModelConfig
from cm3leon.generate.decode import generate_image_tokens
from cm3leon.generate.guidance import next_token_scores, unconditional_prompt
from cm3leon.generate.logits import SamplingConfig, image_allowed, sample
from cm3leon.model.transformer import Transformer, positions_from_valid
from cm3leon.vocab import Vocab


def _left_pad(rows: list[list[int]], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    T = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), T, dtype=torch.long)
    mask = torch.zeros(len(rows), T, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, T - len(r) :] = torch.tensor(r)
        mask[i, T - len(r) :] = 1
    return ids.to(device), mask.to(device)


@torch.inference_mode()
def naive_generate(model: Transformer, vocab: Vocab, cond: list[list[int]], unc: list[list[int]],
                   cfg: SamplingConfig) -> torch.Tensor:
    """[cond; uncond] batch, full forward over the whole prefix every step (no KV cache)."""
    device = next(model.parameters()).device
    ids, mask = _left_pad(cond + unc, device)
    valid = mask.bool()
    allowed = image_allowed(vocab, device)
    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    B = len(cond)
    out = []
    for _ in range(vocab.image_seq_len):
        logits = model(ids, positions_from_valid(valid), key_valid=valid)[:, -1]  # (2B, V)
        tok = sample(next_token_scores(logits.view(2, B, -1), allowed, cfg), gen, greedy=cfg.greedy)
        out.append(tok)
        ids = torch.cat([ids, tok.repeat(2)[:, None]], 1)
        valid = torch.cat([valid, torch.ones_like(valid[:, :1])], 1)
    return vocab.ids_to_codes(torch.stack(out, 1))


def make_hf_generate(model: Transformer, vocab: Vocab) -> Callable[..., torch.Tensor]:
    """transformers generate() with its own CFG on the same weights."""
    from transformers import LogitsProcessor, LogitsProcessorList

    from cm3leon.model.hf import to_hf

    hf = to_hf(model, vocab)
    device = next(model.parameters()).device
    allowed = image_allowed(vocab, device)

    class ImageOnly(LogitsProcessor):
        def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
            return scores.masked_fill(~allowed, float("-inf"))

    @torch.inference_mode()
    def run(cond: list[list[int]], unc: list[list[int]], cfg: SamplingConfig) -> torch.Tensor:
        ids, mask = _left_pad(cond, device)
        uids, umask = _left_pad(unc, device)
        torch.manual_seed(cfg.seed)
        out = hf.generate(
            input_ids=ids, attention_mask=mask, negative_prompt_ids=uids, negative_prompt_attention_mask=umask,
            guidance_scale=cfg.guidance, do_sample=not cfg.greedy, top_p=cfg.top_p, top_k=0,
            temperature=cfg.temperature, max_new_tokens=vocab.image_seq_len, min_new_tokens=vocab.image_seq_len,
            logits_processor=LogitsProcessorList([ImageOnly()]), pad_token_id=vocab.pad_id,
            eos_token_id=None, use_cache=True,
        )
        return vocab.ids_to_codes(out[:, ids.shape[1] :])

    run.attn_implementation = hf.config._attn_implementation  # type: ignore[attr-defined]
    return run


@contextmanager
def fused_decode_steps(model: Transformer) -> Iterator[None]:
    """Inside the block, eager 1-token ``model.forward_cached`` calls run a hand-fused step
    (the same ops in the same order on the weights directly); other calls are unchanged."""
    general = model.forward_cached
    C, nh, hd = model.cfg.d_model, model.cfg.n_heads, model.cfg.head_dim
    act = F.relu if model.cfg.activation == "relu" else F.gelu

    def step(ids, positions, *, kv, slots, attn_mask, last_only=False, head_window=None, image_idx=None):
        if ids.shape[1] != 1 or not isinstance(slots, int):
            return general(ids, positions, kv=kv, slots=slots, attn_mask=attn_mask, last_only=last_only,
                           head_window=head_window, image_idx=image_idx)
        B = ids.shape[0]
        x = model.embed(ids, positions, image_idx).view(B, C)  # (B, C)
        for block, (k_buf, v_buf) in zip(model.blocks, kv):
            qkv = F.linear(F.layer_norm(x, (C,)), block.attn.qkv.weight).view(B, 3, nh, hd)
            k_buf[:, :, slots].copy_(qkv[:, 1])  # (B, nh, hd) into the slot
            v_buf[:, :, slots].copy_(qkv[:, 2])
            q = qkv[:, 0].unsqueeze(2).to(k_buf.dtype)  # (B, nh, 1, hd)
            y = F.scaled_dot_product_attention(q, k_buf[:, :, : slots + 1], v_buf[:, :, : slots + 1],
                                               attn_mask=attn_mask)
            x = x + F.linear(y.to(x.dtype).reshape(B, C), block.attn.out.weight)  # (B, nh, 1, hd) -> (B, C)
            x = x + F.linear(act(F.linear(F.layer_norm(x, (C,)), block.mlp.fc1.weight)), block.mlp.fc2.weight)
        w = model.lm_head.weight if head_window is None else model.lm_head.weight[head_window[0] : head_window[1]]
        return F.linear(F.layer_norm(x, (C,)), w)[:, None]  # (B, 1, V or hi - lo)

    model.forward_cached = step  # an instance attribute shadows the method
    try:
        yield
    finally:
        del model.forward_cached


def _time(fn: Callable[[], object], device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--preset", default="shapes", help="model preset shape (tiny, shapes, 350m, ...)")
    ap.add_argument("--shape", default=None, metavar="D,LAYERS,HEADS",
                    help="override the preset's d_model, n_layers, n_heads (the quickstart model: 128,4,4)")
    ap.add_argument("--prompts", type=int, default=None, help="prompts per batch (cpu 8, cuda 16)")
    ap.add_argument("--image-tokens", type=int, default=None, help="L (cpu 64, cuda 1024)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--baselines", default=None, help="comma list of naive,hf,fused (cpu: all; cuda: hf,fused)")
    ap.add_argument("--compile", action="store_true", help="torch.compile our decode step")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads (default 1: stable timings on a shared, oversubscribed CPU)")
    ap.add_argument("--hbm-tbps", type=float, default=3.35, help="HBM bandwidth for the bound (H100 SXM 3.35)")
    args = ap.parse_args()

    device = torch.device(args.device)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    gpu = device.type == "cuda"
    n_prompts = args.prompts or (16 if gpu else 8)
    L = args.image_tokens or (1024 if gpu else 64)
    baselines = (args.baselines or ("hf,fused" if gpu else "naive,hf,fused")).split(",")
    baselines = [b for b in baselines if b]
    vocab = Vocab.paper() if args.preset in ("350m", "760m", "7b") else Vocab(1000, 512, L)
    vocab = Vocab(vocab.text_size, vocab.image_size, L)
    shape = {}
    if args.shape:
        d, layers, heads = (int(x) for x in args.shape.split(","))
        shape = {"d_model": d, "n_layers": layers, "n_heads": heads}
    mcfg = ModelConfig.from_name(args.preset, vocab_size=vocab.size, **shape)
    torch.manual_seed(0)
    model = Transformer(mcfg)
    with torch.no_grad():
        torch.nn.init.normal_(model.lm_head.weight, std=0.02)  # non-zero head: non-uniform logits
    dtype = torch.bfloat16 if gpu else torch.float32
    model = model.to(device=device, dtype=dtype).eval()

    g = torch.Generator().manual_seed(1)
    cond = []
    for _ in range(n_prompts):
        n = int(torch.randint(4, 24, (1,), generator=g))
        cond.append([vocab.eos_id, *vocab.text_to_ids(torch.randint(0, vocab.text_size, (n,), generator=g).tolist()),
                     vocab.break_id])
    unc = [unconditional_prompt(p, vocab) for p in cond]
    cfg = SamplingConfig(guidance=3.0, top_p=0.9, seed=0)
    greedy = SamplingConfig(guidance=3.0, greedy=True)

    runs: dict[str, Callable[[SamplingConfig], torch.Tensor]] = {
        "ours": lambda c: generate_image_tokens(model, vocab, cond, c, uncond_prompts=unc, compile=args.compile),
    }
    if "naive" in baselines:
        runs["naive"] = lambda c: naive_generate(model, vocab, cond, unc, c)
    if "fused" in baselines:
        def fused(c: SamplingConfig) -> torch.Tensor:
            with fused_decode_steps(model):
                return generate_image_tokens(model, vocab, cond, c, uncond_prompts=unc, compile=args.compile)

        runs["fused"] = fused
    if "hf" in baselines:
        hf_run = make_hf_generate(model, vocab)
        runs["hf"] = lambda c: hf_run(cond, unc, c)
        hf_attn = hf_run.attn_implementation

    result: dict[str, object] = {
        "bench": "decode", "device": str(device), "preset": args.preset, "shape": args.shape,
        "dtype": str(dtype).split(".")[-1],
        "prompts": n_prompts, "image_tokens": L, "streams": 2 * n_prompts, "cfg": cfg.guidance,
        "params": model.num_params(), "repeats": args.repeats, "torch_threads": torch.get_num_threads(),
        "load_avg_1m_start": round(os.getloadavg()[0], 2),
    }
    if "hf" in baselines:
        result["hf_attn_implementation"] = hf_attn
    greedy_out = {name: fn(greedy) for name, fn in runs.items()}  # warm-up + agreement check
    # Round-robin repeats so that load changes on a shared machine hit every decoder alike;
    # the no-cache loop is an order of magnitude slower and is timed once.
    times: dict[str, list[float]] = {name: [] for name in runs}
    for r in range(args.repeats):
        for name, fn in runs.items():
            if name != "naive" or r == 0:
                times[name].append(_time(lambda fn=fn: fn(cfg), device))
    for name in runs:
        sec = statistics.median(times[name])
        result[f"{name}_s_per_batch"] = round(sec, 4)
        result[f"{name}_image_tokens_per_s"] = round(n_prompts * L / sec, 1)
    for name in runs:
        if name != "ours":
            result[f"speedup_vs_{name}"] = round(result[f"{name}_s_per_batch"] / result["ours_s_per_batch"], 2)
            agree = (greedy_out[name].cpu() == greedy_out["ours"].cpu()).float().mean().item()
            result[f"greedy_token_agreement_{name}"] = round(agree, 4)
    if gpu:
        weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        bound = weight_bytes * L / (args.hbm_tbps * 1e12)
        T = max(len(p) for p in cond) + L - 1
        kv_bytes = 2 * mcfg.n_layers * 2 * n_prompts * T * mcfg.d_model * torch.finfo(dtype).bits // 8
        # An upper estimate: the eager path reads the used slots only, compiled steps all of them.
        bound_kv = (weight_bytes + kv_bytes) * L / (args.hbm_tbps * 1e12)
        result.update(
            weight_bytes=weight_bytes, hbm_tbps=args.hbm_tbps, bandwidth_bound_s=round(bound, 4),
            ratio_to_bound=round(result["ours_s_per_batch"] / bound, 2),
            bandwidth_bound_with_kv_s=round(bound_kv, 4),
            ratio_to_bound_with_kv=round(result["ours_s_per_batch"] / bound_kv, 2),
        )
    result["load_avg_1m_end"] = round(os.getloadavg()[0], 2)
    print(json.dumps(result))


if __name__ == "__main__":
    main()

"""Speculative Jacobi decoding (SJD) and lower precision on a TRAINED model: forwards, speed, judged quality.

Acceptance depends on the model's real distribution, so this runs on a trained model
directory (the quickstart's ``model_pretrained``, the model its text-to-image evaluation
and ablations use) with its own text-to-image sampling settings (``generation_config.json``),
in one process:

- forward passes per image, sequential vs SJD (model calls of one batch, the prefill
  included, over the batch's images: every image of a batch is decoded in parallel), and
  what per-row cache lengths would need (``rowwise_bound``: the most any one prompt of the
  batch needs alone; the batch keeps the minimum accepted across rows);
- image tokens/s on one batch of ``--prompts`` prompts with CFG, ``--repeats`` round-robin
  runs, median: sequential, SJD at each ``--windows`` size, and ``transformers``
  ``OPTForCausalLM.generate()`` with its own CFG (``bench_decode.make_hf_generate``) on the
  exportable twin of the model (the same weights without the image-place embeddings, which
  OPT has no slot for: the same work per token minus three embedding lookups);
- the Shapes judge's all-correct rate (:func:`cm3leon.eval.harness.eval_t2i`, every sample
  judged, no re-ranking) for sequential and SJD on the same ``--eval-prompts`` held-out
  prompts (half one-object, half two-object, as the quickstart's evaluation) x ``--samples``;
- the same for each ``--precisions`` (``bf16``, ``int8``: :mod:`cm3leon.generate.precision`).

Prints ONE JSON line. Example (after ``cm3leon quickstart --out runs/qs --preset default``)::

    python benchmarks/bench_sjd.py --model runs/qs/model_pretrained --data runs/qs/data/val --samples 16
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

import cm3leon.generate.decode as decode_mod
from cm3leon.data.dataset import Dataset
from cm3leon.eval.harness import EvalConfig, eval_t2i
from cm3leon.generate.decode import generate_image_tokens
from cm3leon.generate.guidance import unconditional_prompt
from cm3leon.generate.jacobi import jacobi_decode
from cm3leon.generate.precision import for_decoding
from cm3leon.model.transformer import Transformer
from cm3leon.pipeline import CM3Leon
from cm3leon.sequence.sft_templates import render_prompt

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_decode import make_hf_generate  # noqa: E402


class CountForwards:
    """Counts ``model.forward_cached`` calls while active (an instance attribute shadows the method)."""

    def __init__(self, model: Transformer) -> None:
        self.model, self.calls = model, 0

    def __enter__(self) -> CountForwards:
        inner = self.model.forward_cached

        def counted(*a: object, **k: object) -> torch.Tensor:
            self.calls += 1
            return inner(*a, **k)

        self.model.forward_cached = counted  # type: ignore[method-assign]
        return self

    def __exit__(self, *exc: object) -> None:
        del self.model.forward_cached


def exportable_twin(model: Transformer) -> Transformer:
    """The model without the image-place embeddings (image_tokens=0), other weights copied."""
    cfg = dataclasses.replace(model.cfg, image_tokens=0, image_vocab=0, image_axial=False)
    twin = Transformer(cfg)
    state = {k: v for k, v in model.state_dict().items() if not k.startswith(("image_pos_emb", "image_row_emb",
                                                                              "image_col_emb"))}
    twin.load_state_dict(state, strict=True)
    return twin.eval()


def _with_window(pipe: CM3Leon, window: int) -> None:
    t2i = pipe.generation_config.text_to_image
    pipe.generation_config = dataclasses.replace(pipe.generation_config,
                                                 text_to_image=t2i.replace(jacobi_window=window))


def judge_rate(pipe: CM3Leon, records: list, window: int, samples: int, seed: int) -> tuple[float, float]:
    """(all-correct rate, forwards per image) of ``eval_t2i`` with ``window`` drafts (0 = sequential)."""
    _with_window(pipe, window)
    cfg = EvalConfig(n=len(records), batch_size=32, seed=seed)
    with CountForwards(pipe.model) as c:
        res = eval_t2i(pipe, records, cfg, samples=samples, rerank=False)
    batches = -(-len(records) // cfg.batch_size)
    return res.metrics["judge_all_correct"], c.calls / batches


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True, help="a trained model directory (the quickstart's model_pretrained)")
    ap.add_argument("--data", required=True, help="held-out Shapes records (the quickstart's data/val)")
    ap.add_argument("--windows", default="4,8,16,32", help="SJD window sizes to time")
    ap.add_argument("--window", type=int, default=4, help="window of the judged and lower-precision SJD runs")
    ap.add_argument("--prompts", type=int, default=8, help="prompts of the timed batch (x2 streams with CFG)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--eval-prompts", type=int, default=64)
    ap.add_argument("--samples", type=int, default=4, help="images per judged prompt (0: timings only)")
    ap.add_argument("--precisions", default="bf16,int8", help="lower precisions to measure too ('' for none)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    pipe = CM3Leon.from_pretrained(args.model)
    vocab, fp32 = pipe.vocab, pipe.model
    t2i = pipe.generation_config.text_to_image
    cfg = dataclasses.replace(t2i.sampling, seed=args.seed, cd_k=None)
    records = list(Dataset(args.data))
    half = args.eval_prompts // 2
    one = [r for r in records if len(r.meta["objects"]) == 1][:half]
    two = [r for r in records if len(r.meta["objects"]) == 2][: args.eval_prompts - half]
    judged = one + two
    captions = [r.meta["captions"]["detailed"] for r in judged[: args.prompts]]
    cond = [render_prompt("text_to_image", {"caption": c}, pipe.text_tokenizer, vocab)[0] for c in captions]
    unc = [unconditional_prompt(p, vocab) for p in cond]
    windows = sorted({int(w) for w in args.windows.split(",") if w} | {args.window})
    L = vocab.image_seq_len

    result: dict[str, object] = {
        "bench": "sjd", "model": args.model, "params": fp32.num_params(), "image_tokens": L,
        "prompts": len(cond), "streams": 2 * len(cond), "eval_prompts": len(judged), "samples": args.samples,
        "sampling": {"guidance": cfg.guidance, "temperature": cfg.temperature, "top_p": cfg.top_p,
                     "top_k": cfg.top_k},
        "torch_threads": torch.get_num_threads(), "repeats": args.repeats,
        "load_avg_1m_start": round(os.getloadavg()[0], 2),
    }

    def ours(model: Transformer, window: int) -> Callable[[], torch.Tensor]:
        return lambda: generate_image_tokens(model, vocab, cond, cfg, uncond_prompts=unc, jacobi_window=window)

    hf_run = make_hf_generate(exportable_twin(fp32), vocab)
    runs: dict[str, Callable[[], torch.Tensor]] = {"seq": ours(fp32, 0)}
    runs.update({f"sjd{w}": ours(fp32, w) for w in windows})
    runs["hf"] = lambda: hf_run(cond, unc, cfg)
    precisions = [p for p in args.precisions.split(",") if p]
    low = {prec: for_decoding(fp32, prec) for prec in precisions}
    for prec, m in low.items():  # timed in the same round-robin at --window (default 4) drafts
        runs[f"{prec}_seq"], runs[f"{prec}_sjd"] = ours(m, 0), ours(m, args.window)
    forwards: dict[str, int] = {}
    for name, fn in runs.items():  # warm-up, and the forward count of the timed batch
        if name == "hf" or name.split("_")[0] in low:
            fn()
            continue
        with CountForwards(fp32) as c:
            fn()
        forwards[name] = c.calls
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(args.repeats):
        for name, fn in runs.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    tps = {name: len(cond) * L / statistics.median(t) for name, t in times.items()}
    for name in runs:
        result[f"{name}_image_tokens_per_s"] = round(tps[name], 1)
        if name in forwards:
            result[f"{name}_forwards_per_image"] = forwards[name]
    best = max(windows, key=lambda w: tps[f"sjd{w}"])
    window = args.window
    # Per-row cache lengths would let every row advance by its own acceptance: such a batch needs
    # as many iterations as its slowest row needs alone. Each prompt decoded alone measures that.
    alone = []
    for p, u in zip(cond, unc):
        with CountForwards(fp32) as c:
            generate_image_tokens(fp32, vocab, [p], cfg, uncond_prompts=[u], jacobi_window=window)
        alone.append(c.calls)
    result.update(rowwise_bound_forwards_per_image=max(alone),
                  single_prompt_forwards_mean=round(statistics.mean(alone), 1))
    # The paper's initialisation of never-reached drafts (uniform) against ours (the newest p).
    decode_mod.jacobi_decode = functools.partial(jacobi_decode, unreached="uniform")
    try:
        with CountForwards(fp32) as c:
            ours(fp32, window)()
        result["sjd_uniform_init_forwards_per_image"] = c.calls
    finally:
        decode_mod.jacobi_decode = jacobi_decode
    result.update(
        fastest_window=best, judged_window=window,
        forward_reduction=round(forwards["seq"] / forwards[f"sjd{window}"], 2),
        sjd_speedup_vs_seq=round(tps[f"sjd{window}"] / tps["seq"], 2),
        sjd_speedup_vs_hf=round(tps[f"sjd{window}"] / tps["hf"], 2),
        seq_speedup_vs_hf=round(tps["seq"] / tps["hf"], 2),
        hf_attn_implementation=hf_run.attn_implementation,  # type: ignore[attr-defined]
    )
    for prec in precisions:
        result[f"{prec}_sjd_speedup_vs_hf"] = round(tps[f"{prec}_sjd"] / tps["hf"], 2)
        result[f"{prec}_seq_speedup_vs_fp32_seq"] = round(tps[f"{prec}_seq"] / tps["seq"], 2)

    # Judged quality: the same prompts and samples for each path and precision.
    for prec in ["fp32", *precisions]:
        pipe.model = low.get(prec, fp32)
        for path, w in (("seq", 0), ("sjd", window)) if args.samples else ():
            rate, fwd = judge_rate(pipe, judged, w, args.samples, args.seed)
            result[f"{prec}_{path}_judge_all_correct"] = round(rate, 4)
            result[f"{prec}_{path}_eval_forwards_per_image"] = round(fwd, 1)
    pipe.model = fp32
    result["load_avg_1m_end"] = round(os.getloadavg()[0], 2)
    print(json.dumps(result))


if __name__ == "__main__":
    main()

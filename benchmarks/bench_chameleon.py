"""Image generation speed on a Chameleon-shaped model: seconds per image with batched CFG.

One process, one set of random weights: a ``transformers`` ``ChameleonForConditionalGeneration``
and our converted chameleon-family decoder sharing its tensors (no second copy). The same
prompts ``<s> caption <racm3:break>``, Chameleon's own unconditional stream ``<s> <racm3:break>``,
CFG scale 3, temperature 0.7, top-p 0.9, image ids only, ``L`` tokens per image:

- ``ours``: :func:`cm3leon.generate.decode.generate_image_tokens` ([cond; uncond] in one batch
  over the static KV cache);
- ``ours_cdk``: the same with CD-K (k 8);
- ``hf``: ``generate()`` with its own CFG (``guidance_scale`` + ``negative_prompt_ids``: the
  unconditional batch runs as a second cached forward) and an image-only logits processor.
  ``ChameleonForConditionalGeneration`` sets every image id's logit to the dtype's minimum in
  its forward (it generates text only), which makes CFG over images overflow; the benchmark
  empties that list of suppressed ids on its model instance so ``generate()`` can sample images.

Prints ONE JSON line: median seconds per batch over ``--repeats`` runs, seconds per image,
image tokens/s, the ratio hf / ours, peak GPU memory.

CPU smoke run (default): ``--shape tiny`` (2 layers, 64 wide, 64 tokens per image).
GPU: ``--device cuda --shape 7b`` (``ChameleonConfig()``'s defaults, bf16, 1,024 tokens per image).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from cm3leon.generate.decode import generate_image_tokens
from cm3leon.generate.logits import SamplingConfig
from cm3leon.model.chameleon_convert import convert_state_dict, id_table, model_config_from_hf
from cm3leon.model.transformer import Transformer
from cm3leon.vocab import Vocab

SHAPES = {
    "tiny": dict(vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=4, codes=256, tokens=64),
    "7b": dict(codes=8192, tokens=1024),  # ChameleonConfig() defaults otherwise
}


def vocabulary_map(size: int, codes: int) -> dict[str, int]:
    """Chameleon's layout: <s> <pad> </s> <unk>, the IMGIMG entries, <eoss> <racm3:break>, then text."""
    names = ["<s>", "<pad>", "</s>", "<unk>"]
    names += ["IMGIMG" + "".join(chr(ord("A") + int(d)) for d in str(c)) + "Z" for c in range(codes)]
    names += ["<eoss>", "<racm3:break>", "<image>"]
    names += [f"t{i}" for i in range(size - len(names))]
    return {n: i for i, n in enumerate(names)}


def build(shape: str, device: str, dtype: torch.dtype):
    """(hf model, our model sharing its weights, vocab) with random weights."""
    from transformers import ChameleonConfig, ChameleonForConditionalGeneration

    spec = dict(SHAPES[shape])
    codes, tokens = spec.pop("codes"), spec.pop("tokens")
    size = spec.get("vocab_size", 65536)
    vm = vocabulary_map(size, codes)
    hf_cfg = ChameleonConfig(**spec, vocabulary_map=vm, bos_token_id=0, pad_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    with torch.device(device):
        hf = ChameleonForConditionalGeneration(hf_cfg).to(dtype).eval()
    cfg = model_config_from_hf(hf_cfg.to_dict())
    with torch.device("meta"):
        ours = Transformer(cfg)
    ours.load_state_dict(convert_state_dict(hf.state_dict()), strict=True, assign=True)  # the same tensors
    return hf, ours.eval(), Vocab.from_table(id_table(vm, cfg.vocab_size), tokens)


def make_hf_generate(hf, vocab: Vocab):
    """transformers generate() with its own CFG, image ids only."""
    from transformers import LogitsProcessor, LogitsProcessorList

    device = next(hf.parameters()).device
    allowed = vocab.image_mask(device)
    hf.model.vocabulary_mapping.__dict__["image_tokens"] = []  # no suppression of image ids (see the docstring)

    class ImageOnly(LogitsProcessor):
        def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
            return scores.masked_fill(~allowed, float("-inf"))

    @torch.inference_mode()
    def run(cond: list[list[int]], unc: list[int], cfg: SamplingConfig) -> torch.Tensor:
        ids = torch.tensor(cond, device=device)
        torch.manual_seed(cfg.seed)
        return hf.generate(
            input_ids=ids, negative_prompt_ids=torch.tensor([unc] * len(cond), device=device),
            guidance_scale=cfg.guidance, do_sample=True, top_p=cfg.top_p, top_k=0, temperature=cfg.temperature,
            max_new_tokens=vocab.image_seq_len, min_new_tokens=vocab.image_seq_len,
            logits_processor=LogitsProcessorList([ImageOnly()]), pad_token_id=vocab.pad_id, eos_token_id=None,
        )[:, ids.shape[1]:]

    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="tiny", choices=sorted(SHAPES))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--prompts", type=int, default=4, help="images per batch (each with its CFG stream)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-hf", action="store_true", help="skip the transformers baseline")
    ap.add_argument("--threads", type=int, default=1, help="torch threads on CPU")
    args = ap.parse_args()
    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    hf, ours, vocab = build(args.shape, args.device, dtype)
    words = [v for v in range(vocab.size) if vocab.kind(v).value == "text"][:64]
    prompts = [[vocab.eos_id, *words[3 * i : 3 * i + 8], vocab.break_id] for i in range(args.prompts)]
    unc = [vocab.eos_id, vocab.break_id]
    cfg = SamplingConfig(guidance=3.0, temperature=0.7, top_p=0.9)
    runs = {
        "ours": lambda: generate_image_tokens(ours, vocab, prompts, cfg, uncond_prompts=[unc] * len(prompts)),
        "ours_cdk": lambda: generate_image_tokens(ours, vocab, prompts, SamplingConfig(cd_k=8, temperature=0.7),
                                                  uncond_prompts=[unc] * len(prompts)),
    }
    if not args.no_hf:
        hf_run = make_hf_generate(hf, vocab)
        runs["hf"] = lambda: hf_run(prompts, unc, cfg)
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    times: dict[str, list[float]] = {k: [] for k in runs}
    for fn in runs.values():  # warm-up
        fn()
    for _ in range(args.repeats):  # round robin: load changes hit every decoder alike
        for name, fn in runs.items():
            sync()
            t = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    out = {
        "bench": "chameleon_image", "shape": args.shape, "device": args.device, "dtype": str(dtype),
        "params": ours.num_params(), "tokens_per_image": vocab.image_seq_len, "images_per_batch": args.prompts,
        **{f"{k}_s_per_batch": round(v, 4) for k, v in med.items()},
        **{f"{k}_s_per_image": round(v / args.prompts, 4) for k, v in med.items()},
        **{f"{k}_image_tokens_per_s": round(args.prompts * vocab.image_seq_len / v, 1) for k, v in med.items()},
    }
    if "hf" in med:
        out["hf_over_ours"] = round(med["hf"] / med["ours"], 2)
    if args.device.startswith("cuda"):
        out["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    print(json.dumps(out))


if __name__ == "__main__":
    main()

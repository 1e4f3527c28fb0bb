"""Image tokenizer throughput: encode and decode images/s at 32 px (shapes-32) and 256 px
(paper-256, random weights). Baseline measured in the same process: transformers'
``ChameleonVQVAE.encode`` with the same paper-256 weights (the decoder has no HF
counterpart), timed alternately with ours so both see the same machine load. Prints one JSON
line (medians over repeats).

    python benchmarks/bench_image_vq.py                 # CPU, ~1 minute
    python benchmarks/bench_image_vq.py --device cuda --batch-256 32 --repeats 20
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from cm3leon.tokenize.image_vq import ImageTokenizer, VQConfig


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _median_seconds(fn, repeats: int, device: torch.device) -> float:
    fn()  # warm-up
    _sync(device)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def _interleaved_medians(fa, fb, repeats: int, device: torch.device) -> tuple[float, float]:
    """Median seconds of ``fa`` and ``fb`` timed alternately, so both see the same machine load."""
    fa(), fb()
    ta, tb = [], []
    for _ in range(repeats):
        for fn, acc in ((fa, ta), (fb, tb)):
            _sync(device)
            t = time.perf_counter()
            fn()
            _sync(device)
            acc.append(time.perf_counter() - t)
    return statistics.median(ta), statistics.median(tb)


def _hf_baseline(model: ImageTokenizer, device: torch.device):
    from transformers import ChameleonVQVAEConfig
    from transformers.models.chameleon.modeling_chameleon import ChameleonVQVAE

    c = model.cfg
    hc = ChameleonVQVAEConfig(
        embed_dim=c.embed_dim, num_embeddings=c.codebook_size, latent_channels=c.z_channels, resolution=c.resolution,
        in_channels=c.in_channels, base_channels=c.ch, channel_multiplier=list(c.ch_mult),
        num_res_blocks=c.num_res_blocks, attn_resolutions=list(c.attn_resolutions),
    )
    hf = ChameleonVQVAE(hc).eval()
    sd = {k: v for k, v in model.state_dict().items() if not k.startswith("decoder.")}
    hf.load_state_dict(sd, strict=True)
    return hf.to(device)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--batch-32", type=int, default=64)
    ap.add_argument("--batch-256", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-baseline", action="store_true", help="skip the transformers baseline")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    result: dict[str, object] = {"bench": "image_vq", "device": str(device), "threads": torch.get_num_threads()}

    with torch.no_grad():
        for name, batch in (("shapes-32", args.batch_32), ("paper-256", args.batch_256)):
            model = ImageTokenizer(VQConfig.from_name(name)).to(device).eval()
            r = model.resolution
            x = torch.rand(batch, 3, r, r, device=device) * 2 - 1
            codes = model.encode(x)
            t_enc = _median_seconds(lambda: model.encode(x), args.repeats, device)  # noqa: B023
            t_dec = _median_seconds(lambda: model.decode(codes), args.repeats, device)  # noqa: B023
            key = name.replace("-", "_")
            result[f"{key}_batch"] = batch
            result[f"{key}_encode_img_s"] = round(batch / t_enc, 2)
            result[f"{key}_decode_img_s"] = round(batch / t_dec, 2)
            if name == "paper-256" and not args.no_baseline:
                hf = _hf_baseline(model, device)
                assert torch.equal(hf.encode(x).image_tokens.view(batch, -1), codes)
                t_ours, t_hf = _interleaved_medians(lambda: model.encode(x), lambda: hf.encode(x),  # noqa: B023
                                                    args.repeats, device)
                result[f"{key}_hf_encode_img_s"] = round(batch / t_hf, 2)
                result[f"{key}_encode_speedup_vs_hf"] = round(t_hf / t_ours, 3)
            if device.type == "cuda":
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    t_bf = _median_seconds(lambda: model.encode(x), args.repeats, device)  # noqa: B023
                result[f"{key}_encode_bf16_img_s"] = round(batch / t_bf, 2)
                result[f"{key}_encode_speedup_bf16_vs_fp32"] = round(t_enc / t_bf, 3)
    print(json.dumps(result))


if __name__ == "__main__":
    main()

"""Retrieval speed: FAISS exact vs IVF (build time, queries/s, recall@10) and encoder throughput.

Prints ONE JSON line. Baselines are measured in the same process: IVF is compared with the
exact Flat index (speed-up and recall@10 against its exact top-10; also recall@10 after
re-scoring 40 candidates exactly, which is what the Retriever does), the in-house encoder
with a CLIP ViT-B/32 of the paper's architecture (random weights: throughput does not depend
on them). Timings are medians over ``--repeats`` runs.

Data: ``--n`` (default 100k; ``--full`` = 1M) random 512-d unit vectors drawn from a mixture
of Gaussians (real embeddings are clustered; ``--uniform`` gives isotropic vectors, the
worst case for IVF); queries are perturbed bank vectors.

    python benchmarks/bench_retrieval.py            # ~1-2 minutes on 2 CPU cores
    python benchmarks/bench_retrieval.py --full     # 1M vectors, IVF1024 (several minutes)
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import faiss
import numpy as np
import torch

from cm3leon.retrieval.index import MemoryIndex


def synthetic(n: int, dim: int, *, uniform: bool, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if uniform:
        x = rng.standard_normal((n, dim), dtype=np.float32)
    else:
        centers = rng.standard_normal((max(16, n // 100), dim), dtype=np.float32)
        x = np.empty((n, dim), np.float32)
        for s in range(0, n, 65_536):  # chunked to bound temporary memory
            b = min(n, s + 65_536) - s
            noise = 0.5 * rng.standard_normal((b, dim), dtype=np.float32)
            x[s : s + b] = centers[rng.integers(0, len(centers), b)] + noise
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def queries_from(x: np.ndarray, nq: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed + 1)
    noise = rng.standard_normal((nq, x.shape[1]), dtype=np.float32) * (0.5 / np.sqrt(x.shape[1]))  # norm ~0.5
    q = x[rng.choice(len(x), nq, replace=False)] + noise
    return (q / np.linalg.norm(q, axis=1, keepdims=True)).astype(np.float32)


def median_time(fn, repeats: int) -> float:
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def bench_index(x: np.ndarray, q: np.ndarray, factories: list[str], nprobe: int, ef_search: int, k: int,
                repeats: int) -> dict:
    t0 = time.perf_counter()
    flat = MemoryIndex.build(x, factory="Flat")
    flat_build = time.perf_counter() - t0
    t_flat = median_time(lambda: flat.search(q, k), repeats)
    _, exact = flat.search(q, k)
    out = {"flat": {"build_s": round(flat_build, 3), "qps": round(len(q) / t_flat, 1)}, "ivf": []}
    for factory in factories:
        idx = MemoryIndex.empty(x.shape[1], factory=factory)
        t0 = time.perf_counter()
        idx.train(x, train_size=min(len(x), 25_000))
        t_train = time.perf_counter() - t0
        t0 = time.perf_counter()
        idx.add(x)
        t_add = time.perf_counter() - t0
        knobs = {}
        if idx.nprobe is not None:
            idx.nprobe = knobs["nprobe"] = nprobe
        if idx.efSearch is not None:
            idx.efSearch = knobs["efSearch"] = ef_search
        t = median_time(lambda idx=idx: idx.search(q, k), repeats)
        _, got = idx.search(q, k)
        recall = float(np.mean([len(set(a) & set(b)) / k for a, b in zip(got, exact)]))
        # what the Retriever gets: 4k candidates re-scored exactly from embeddings.npy
        _, cand = idx.search(q, 4 * k)
        rescored = np.einsum("nkd,nd->nk", x[np.maximum(cand, 0)], q)
        top = np.take_along_axis(cand, np.argsort(-np.where(cand >= 0, rescored, -np.inf), axis=1)[:, :k], 1)
        recall_rr = float(np.mean([len(set(a) & set(b)) / k for a, b in zip(top, exact)]))
        out["ivf"].append({
            "factory": factory, **knobs, "train_s": round(t_train, 2), "add_s": round(t_add, 2),
            "qps": round(len(q) / t, 1), f"recall@{k}": round(recall, 4),
            f"recall@{k}_rescored_from_{4 * k}": round(recall_rr, 4),
            "speedup_vs_flat": round(t_flat / t, 2),
            "bytes_per_vector": int(faiss.serialize_index(idx.index).size // len(x)),
        })
    out["flat"]["bytes_per_vector"] = int(faiss.serialize_index(flat.index).size // len(x))
    return out


def bench_encoder(n_docs: int, repeats: int, with_clip: bool) -> dict:
    from cm3leon.data.records import DocRecord
    from cm3leon.retrieval.encoder import DualEncoder, DualEncoderConfig, DualEncoderModel
    from cm3leon.shapes.captions import describe
    from cm3leon.shapes.render import render
    from cm3leon.shapes.world import ShapesConfig, sample_scene
    from cm3leon.tokenize.text_bpe import TextTokenizer

    rng, cfg = np.random.default_rng(0), ShapesConfig(size=32)
    scenes = [sample_scene(rng, cfg) for _ in range(n_docs)]
    docs = [DocRecord(str(i), describe(s), render(s, cfg)) for i, s in enumerate(scenes)]
    tok = TextTokenizer.train([d.text for d in docs], 512)
    torch.manual_seed(0)
    enc = DualEncoder(DualEncoderModel(DualEncoderConfig(vocab_size=tok.vocab_size)), tok)
    enc.embed_documents(docs[:64])  # warm-up
    t_doc = median_time(lambda: enc.embed_documents(docs), repeats)
    t_txt = median_time(lambda: enc.embed_text([d.text for d in docs]), repeats)
    t_img = median_time(lambda: enc.embed_image([d.image for d in docs]), repeats)
    out = {
        "name": enc.name, "docs": n_docs, "docs_per_s": round(n_docs / t_doc, 1),
        "texts_per_s": round(n_docs / t_txt, 1), "images_per_s": round(n_docs / t_img, 1),
        "params": sum(p.numel() for p in enc.model.parameters()),
    }
    if with_clip:
        out.update(bench_clip_baseline(docs[:16], n_docs / t_doc))
    return out


def bench_clip_baseline(docs: list, ours_docs_per_s: float) -> dict:
    """Document embedding with CLIP ViT-B/32's architecture (the paper's retriever)."""
    from transformers import CLIPConfig, CLIPModel

    from cm3leon.retrieval.clip_hf import CLIPEncoder

    class _Tok:  # fixed-length ids: throughput of the text tower does not depend on the vocabulary
        def __call__(self, texts, **kw):
            ids = torch.randint(1, 49407, (len(texts), 16))
            return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    class _Proc:
        def __call__(self, images, **kw):
            return {"pixel_values": torch.randn(len(images), 3, 224, 224)}

    torch.manual_seed(0)
    model = CLIPModel(CLIPConfig(projection_dim=512)).eval()  # defaults = ViT-B/32 + 12-layer text tower
    enc = CLIPEncoder(model, _Tok(), _Proc(), source="vit-b-32-architecture", batch_size=16)
    enc.embed_documents(docs[:2])
    t = median_time(lambda: enc.embed_documents(docs), 1)  # ~10 s a run on 2 cores
    clip_rate = len(docs) / t
    return {"clip_vit_b32_docs_per_s": round(clip_rate, 2),
            "speedup_vs_clip_vit_b32": round(ours_docs_per_s / clip_rate, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--full", action="store_true", help="1M vectors and IVF1024 (several minutes)")
    ap.add_argument("--n", type=int, default=None, help="bank size (default 100k, 1M with --full)")
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("-k", type=int, default=10)
    ap.add_argument("--nprobe", type=int, default=16, help="IVF lists probed (default 16)")
    ap.add_argument("--ef-search", type=int, default=64, help="HNSW efSearch (default 64)")
    ap.add_argument("--factories", default=None,
                    help="';'-separated factories, e.g. 'IVF256,Flat;HNSW32' (default by size)")
    ap.add_argument("--uniform", action="store_true", help="isotropic random vectors instead of clustered ones")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--encoder-docs", type=int, default=1024)
    ap.add_argument("--no-clip", action="store_true", help="skip the CLIP ViT-B/32 baseline")
    ap.add_argument("--threads", type=int, default=None, help="FAISS/torch threads (default: library default)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    n = args.n or (1_000_000 if args.full else 100_000)
    if args.factories:
        factories = [f for f in args.factories.split(";") if f]
    else:
        nlist = 1024 if n >= 500_000 else 256
        factories = [f"IVF{nlist},Flat", f"IVF{nlist},PQ64"]  # add HNSW32 with --factories (+40 s)
    if args.threads:
        faiss.omp_set_num_threads(args.threads)
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    x = synthetic(n, args.dim, uniform=args.uniform, seed=args.seed)
    q = queries_from(x, args.queries, args.seed)
    result = {
        "bench": "retrieval", "n": n, "dim": args.dim, "queries": args.queries, "k": args.k,
        "data": "uniform" if args.uniform else "clustered", "threads": faiss.omp_get_max_threads(),
        **bench_index(x, q, factories, args.nprobe, args.ef_search, args.k, args.repeats),
    }
    del x
    result["encoder"] = bench_encoder(args.encoder_docs, args.repeats, not args.no_clip)
    result["total_s"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(result))


if __name__ == "__main__":
    main()

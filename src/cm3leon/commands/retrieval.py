"""``cm3leon retrieval ...`` (the encoder) and ``cm3leon index ...`` (the memory bank)."""

from __future__ import annotations

import argparse
import json
import sys
import textwrap
import time
from pathlib import Path
from typing import Any


def _raw(text: str) -> str:
    return textwrap.dedent(text).strip("\n")


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``cm3leon retrieval train-encoder|eval`` and ``cm3leon index build|search|neighbors``."""
    p = subparsers.add_parser(
        "retrieval", help="train / evaluate the retrieval encoder (in-house CLIP-style dual encoder)",
        description="The dense bi-encoder of the retriever (paper §2.1). Real CLIP models (e.g. ViT-B-32) are "
        "used directly from a local transformers directory; the in-house encoder is trained here.",
    )
    sub = p.add_subparsers(dest="retrieval_command", metavar="SUBCOMMAND")
    _add_train_encoder(sub)
    _add_eval(sub)
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])

    q = subparsers.add_parser(
        "index", help="build / search the FAISS memory bank; precompute training neighbours",
        description="The memory bank: document vectors of a dataset in a FAISS index (exact or approximate "
        "maximum inner product search), the paper's retrieval policy, and neighbours for pretraining.",
    )
    isub = q.add_subparsers(dest="index_command", metavar="SUBCOMMAND")
    _add_build(isub)
    _add_search(isub)
    _add_neighbors(isub)
    q.set_defaults(func=lambda args: (q.print_help(), 2)[1])


# ---- shared helpers ------------------------------------------------------------------
def _quiet_faiss() -> None:
    """FAISS logs which CPU build it loads at INFO level; that is noise on the command line."""
    import logging

    logging.getLogger("faiss.loader").setLevel(logging.WARNING)


def _open_dataset(path: str, columns: list[str]) -> Any:
    from cm3leon.data.dataset import Dataset, is_dataset_dir

    if not Path(path).exists():
        raise FileNotFoundError(f"--data {path} does not exist")
    if not is_dataset_dir(path):
        raise ValueError(
            f"{path} is not a cm3leon dataset directory (no manifest.json); convert raw data first with "
            "`cm3leon data convert` (the memory bank's ids are the dataset's row numbers)"
        )
    ds = Dataset(path, columns=columns)
    if len(ds) == 0:
        raise ValueError(f"dataset {path} is empty: the memory bank needs at least one document")
    return ds


def _shapes_key(rec: Any) -> Any:
    objs = rec.meta.get("objects") if rec.meta else None
    return None if objs is None else tuple(sorted((o["shape"], o["color"]) for o in objs))


def _recall_keys(records: list[Any]) -> tuple[list[Any], str]:
    """Relevance keys: the (shape, color) multiset for Shapes-like data, else the pair itself."""
    keys = [_shapes_key(r) for r in records]
    if all(k is not None for k in keys):
        return keys, "same multiset of (shape, color)"
    return list(range(len(records))), "own image only"


# ---- retrieval train-encoder -------------------------------------------------------------
def _add_train_encoder(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train-encoder",
        help="train the in-house dual encoder on a dataset's caption-image pairs",
        description="Train the small CLIP-style dual encoder (BPE text transformer + CNN image tower, "
        "symmetric InfoNCE with in-batch negatives and a learnable temperature). The last pairs (--holdout, or "
        "by default 5% of them, at least 32 and at most 1000) are kept out of training and used to report "
        "text->image recall@1/@10.",
        epilog=_raw("""
            example:
              cm3leon retrieval train-encoder --data data/shapes32 --text-tokenizer tok/text --out enc --steps 250
            """),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--data", required=True, help="cm3leon dataset directory (caption-image records)")
    p.add_argument("--out", required=True, help="output encoder directory")
    p.add_argument("--text-tokenizer",
                   help="text tokenizer dir (default: train one on the captions, saved inside --out)")
    p.add_argument("--text-vocab-size", type=int, default=512, help="BPE size when training a tokenizer (default 512)")
    p.add_argument("--steps", type=int, default=250, help="optimizer steps (default 250, ~2 CPU minutes)")
    p.add_argument("--batch-size", type=int, default=256, help="pairs per step = in-batch negatives (default 256)")
    p.add_argument("--lr", type=float, default=3e-3, help="peak learning rate (default 3e-3)")
    p.add_argument("--dim", type=int, default=128, help="embedding dimension (default 128)")
    p.add_argument("--image-size", type=int, default=32, help="image tower input side in pixels (default 32)")
    p.add_argument("--holdout", type=int, default=None,
                   help="pairs held out for the recall report (default: --holdout-fraction of the pairs, at least "
                   "32, at most 1000, never more than 20%%)")
    p.add_argument("--holdout-fraction", type=float, default=0.05,
                   help="share of the pairs held out when --holdout is not given (default 0.05)")
    p.add_argument("--limit", type=int, default=None, help="use at most this many records")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    p.set_defaults(func=_run_train_encoder)


def _run_train_encoder(args: argparse.Namespace) -> int:
    from cm3leon.retrieval.encoder import (
        DualEncoderConfig,
        EncoderTrainConfig,
        text_to_image_recall,
        train_dual_encoder,
    )
    from cm3leon.tokenize.text_bpe import TextTokenizer

    ds = _open_dataset(args.data, ["text", "image", "meta"])
    records = []
    for r in ds:
        if r.text is not None and r.image is not None:
            records.append(r)
        if args.limit and len(records) >= args.limit:
            break
    if len(records) < 4:
        raise ValueError(f"{args.data} has {len(records)} caption-image records; the encoder needs pairs to train on")
    holdout = _encoder_holdout(len(records), args.holdout, args.holdout_fraction)
    train, val = records[: len(records) - holdout], records[len(records) - holdout :]
    texts = [r.text for r in train]
    if args.text_tokenizer:
        tok = TextTokenizer.load(args.text_tokenizer)
    else:
        tok = TextTokenizer.train(texts, args.text_vocab_size)
    t0 = time.time()
    enc = train_dual_encoder(
        texts, [r.image for r in train], tokenizer=tok,
        cfg=DualEncoderConfig(vocab_size=tok.vocab_size, dim=args.dim, image_size=args.image_size),
        train_cfg=EncoderTrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed),
        device=args.device, progress=True,
    )
    seconds = time.time() - t0
    report: dict[str, Any] = {"pairs": len(train), "seconds": round(seconds, 1)}
    if val:
        keys, rule = _recall_keys(val)
        rec = text_to_image_recall(enc.embed_text([r.text for r in val]), enc.embed_image([r.image for r in val]), keys)
        report.update(held_out=len(val), relevance=rule, **rec)
        enc.info["eval"] = {"held_out": len(val), "relevance": rule, **rec}
    enc.save(args.out)
    print(json.dumps({"encoder": args.out, **report}))
    return 0


def _encoder_holdout(n: int, holdout: int | None, fraction: float) -> int:
    """Pairs held out of ``n`` (an explicit count is kept to at most 20%); a warning when that is
    more than a tenth of the data."""
    from cm3leon.data.split import holdout_size

    if holdout is not None and holdout < 0:
        raise ValueError(f"--holdout must be >= 0, got {holdout}")
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"--holdout-fraction must be in [0, 1), got {fraction}")
    k = holdout_size(n, fraction=fraction) if holdout is None else min(holdout, n // 5)
    if k > n // 10:
        print(f"warning: holding out {k} of {n} pairs ({100 * k / n:.0f}%) from encoder training; "
              "lower --holdout / --holdout-fraction to train on more", file=sys.stderr)
    return k


# ---- retrieval eval ----------------------------------------------------------------------
def _add_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="text->image recall@1/@10 of an encoder on a dataset",
                       description="Embed the captions and images of --data (first --limit caption-image records) and "
                       "report text->image recall@k (Shapes: relevant = same multiset of (shape, color)).")
    p.add_argument("--encoder", required=True, help="encoder directory (in-house or a local CLIP directory)")
    p.add_argument("--data", required=True, help="cm3leon dataset directory")
    p.add_argument("--limit", type=int, default=1000, help="records to evaluate (default 1000)")
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=_run_eval)


def _run_eval(args: argparse.Namespace) -> int:
    from cm3leon.retrieval.encoder import load_encoder, text_to_image_recall

    enc = load_encoder(args.encoder, device=args.device)
    recs = []
    for r in _open_dataset(args.data, ["text", "image", "meta"]):
        if r.text is not None and r.image is not None:
            recs.append(r)
            if len(recs) >= args.limit:
                break
    if not recs:
        raise ValueError(f"{args.data} has no caption-image records to evaluate on")
    keys, rule = _recall_keys(recs)
    rec = text_to_image_recall(enc.embed_text([r.text for r in recs]), enc.embed_image([r.image for r in recs]), keys)
    print(json.dumps({"encoder": enc.name, "n": len(recs), "relevance": rule, **rec}))
    return 0


# ---- index build -------------------------------------------------------------------------
def _add_build(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "build",
        help="embed a dataset and build its FAISS memory bank",
        description="Embed every document of --data with --encoder (document vector = mean of normalized text and "
        "image embeddings) into embeddings.npy, then build a FAISS inner-product index (index_factory string: "
        "'Flat' exact, 'IVF1024,PQ64' / 'IVF256,Flat' / 'HNSW32' approximate). Index id = dataset row.",
        epilog=_raw("""
            examples:
              cm3leon index build --data data/shapes32 --encoder enc --out bank
              cm3leon index build --data data/big --encoder clip-vit-b32/ --out bank --factory IVF4096,PQ64 --nprobe 32
            """),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--data", required=True, help="cm3leon dataset directory (the memory bank's documents)")
    p.add_argument("--encoder", required=True, help="encoder directory (in-house or a local CLIP directory)")
    p.add_argument("--out", required=True, help="output index directory")
    p.add_argument("--factory", default="Flat", help="FAISS index_factory string (default Flat = exact)")
    p.add_argument("--nprobe", type=int, default=None, help="IVF lists probed per query (saved with the index)")
    p.add_argument("--ef-search", type=int, default=None, help="HNSW efSearch (saved with the index)")
    p.add_argument("--train-size", type=int, default=100_000, help="vectors sampled to train IVF/PQ (default 100k)")
    p.add_argument("--batch-size", type=int, default=256, help="documents embedded per batch (default 256)")
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=_run_build)


def _run_build(args: argparse.Namespace) -> int:
    _quiet_faiss()
    from cm3leon.retrieval.encoder import load_encoder
    from cm3leon.retrieval.index import build_bank

    ds = _open_dataset(args.data, ["text", "image"])
    enc = load_encoder(args.encoder, device=args.device)
    t0 = time.time()
    bank = build_bank(
        iter(ds), n=len(ds), encoder=enc, out=args.out, factory=args.factory, batch_size=args.batch_size,
        train_size=args.train_size, progress=True,
        info={"data": str(Path(args.data).resolve()), "encoder_dir": str(Path(args.encoder).resolve())},
    )
    if args.nprobe is not None or args.ef_search is not None:
        if args.nprobe is not None:
            bank.index.nprobe = args.nprobe
        if args.ef_search is not None:
            bank.index.efSearch = args.ef_search
        bank.index.save(args.out)
    print(json.dumps({"index": args.out, "n": len(bank), "dim": bank.dim, "factory": args.factory,
                      "encoder": enc.name, "seconds": round(time.time() - t0, 1)}))
    return 0


# ---- index search ------------------------------------------------------------------------
def _add_search(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "search",
        help="show the documents nearest to a text and/or image query",
        description="Embed the query with the index's encoder and print the top documents (id, score, caption). "
        "A text and an image together form a document query (mean of the two). --policy applies the paper's "
        "retrieval policy (relevance <= 0.9, dedup, multi-modal first) instead of the plain top-k.",
        epilog=_raw("""
            examples:
              cm3leon index search --index bank "a red circle and a blue square" -k 5
              cm3leon index search --index bank --image query.png --policy
            """),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--index", required=True, help="index directory (from `cm3leon index build`)")
    p.add_argument("query", nargs="?", default=None, help="query text")
    p.add_argument("--image", help="query image file")
    p.add_argument("-k", type=int, default=5, help="documents to show (default 5)")
    p.add_argument("--policy", action="store_true", help="apply the retrieval policy (k split over text/image)")
    p.add_argument("--duplicates", choices=["score", "content"], default="score",
                   help="with --policy: how exact duplicate captions are treated (see `index neighbors --help`)")
    p.add_argument("--encoder", help="encoder directory (default: the one the index was built with)")
    p.add_argument("--data", help="dataset directory for captions (default: the one the index was built from)")
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=_run_search)


def _index_sources(index_dir: str, encoder: str | None, data: str | None) -> tuple[str, str | None]:
    from cm3leon.retrieval.index import read_meta

    info = read_meta(index_dir).get("info", {})
    enc = encoder or info.get("encoder_dir")
    if enc is None:
        raise ValueError(f"{index_dir} does not record its encoder directory; pass --encoder DIR")
    return enc, data or info.get("data")


def _run_search(args: argparse.Namespace) -> int:
    _quiet_faiss()
    import numpy as np
    from PIL import Image

    from cm3leon.data.records import DocRecord
    from cm3leon.retrieval.encoder import load_encoder
    from cm3leon.retrieval.encoder_base import combine_embeddings
    from cm3leon.retrieval.index import MemoryBank
    from cm3leon.retrieval.retriever import Retriever, RetrieverConfig

    if args.query is None and args.image is None:
        raise ValueError("give a query text, --image PATH, or both")
    if args.k <= 0:
        raise ValueError(f"-k must be positive, got {args.k}")
    enc_dir, data_dir = _index_sources(args.index, args.encoder, args.data)
    bank = MemoryBank.load(args.index)
    enc = load_encoder(enc_dir, device=args.device)
    if enc.dim != bank.dim:
        raise ValueError(f"encoder {enc_dir} makes {enc.dim}-d vectors but the index holds {bank.dim}-d ones; "
                         "pass the encoder the index was built with (--encoder)")
    image = None
    if args.image:
        if not Path(args.image).exists():
            raise FileNotFoundError(f"--image {args.image} not found")
        image = Image.open(args.image).convert("RGB")
    if args.policy:
        kt = (args.k + 1) // 2 if args.query and image else (args.k if args.query else 0)
        cfg = RetrieverConfig(k_text=kt, k_image=args.k - kt, duplicates=args.duplicates)
        got = Retriever(bank, enc, cfg).retrieve([DocRecord("query", args.query, image)])
        ids, scores = got.ids[0], got.scores[0]
    else:
        t = enc.embed_text([args.query]) if args.query else np.zeros((1, enc.dim), np.float32)
        v = enc.embed_image([image]) if image is not None else np.zeros((1, enc.dim), np.float32)
        q = combine_embeddings(t, v, has_text=np.array([args.query is not None]),
                               has_image=np.array([image is not None]))
        scores, ids = bank.index.search(q, args.k)
        ids, scores = ids[0], scores[0]
    captions = _captions(data_dir, [int(i) for i in ids if i >= 0])
    for i, s in zip(ids, scores):
        if i < 0:
            continue
        print(f"{int(i):>8d}  {float(s):.4f}  {captions.get(int(i), '')}")
    return 0


def _captions(data_dir: str | None, ids: list[int]) -> dict[int, str]:
    from cm3leon.data.dataset import Dataset, is_dataset_dir

    if not data_dir or not is_dataset_dir(data_dir):
        return {}
    ds = Dataset(data_dir, columns=["text"])
    out = {}
    for i in ids:
        if 0 <= i < len(ds):
            r = ds[i]
            out[i] = r.text if r.text is not None else "<image only>"
    return out


# ---- index neighbors ---------------------------------------------------------------------
def _add_neighbors(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "neighbors",
        help="precompute every training document's retrieved neighbours (neighbors.npy)",
        description="Apply the retrieval policy to every document of the dataset the index was built from "
        "(or --data) in one batched pass and write neighbors.npy (int64 [N, k_text+k_image], -1 = none; row = "
        "dataset row) plus neighbors.json (config, encoder, index, fill rate, mean relevance). Training "
        "neighbours use query dropout; --inference turns it off.",
        epilog=_raw("""
            examples:
              cm3leon index neighbors --index bank                      # -> bank/neighbors.npy
              cm3leon index neighbors --index bank --data data/val --other-data --inference --out val_nb.npy
            """),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--index", required=True, help="index directory")
    p.add_argument("--out", help="output .npy (default: INDEX/neighbors.npy; neighbors.json is written beside)")
    p.add_argument("--data", help="dataset to retrieve for (default: the index's own dataset)")
    p.add_argument("--other-data", action="store_true",
                   help="--data is not the bank's dataset (rows are not bank ids: no self-exclusion by id)")
    p.add_argument("--encoder", help="encoder directory (default: the one the index was built with)")
    p.add_argument("--inference", action="store_true", help="no query dropout (inference-time neighbours)")
    p.add_argument("--k-text", type=int, default=2, help="documents retrieved by the text query (default 2)")
    p.add_argument("--k-image", type=int, default=2, help="documents retrieved by the image query (default 2)")
    p.add_argument("--max-relevance", type=float, default=0.9, help="skip candidates scoring above this (default 0.9)")
    p.add_argument("--dedup", type=float, default=0.95, help="skip near-duplicates above this cosine (default 0.95)")
    p.add_argument("--duplicates", choices=["score", "content"], default="score",
                   help="exact duplicate captions: 'score' (paper) caps every candidate by its score, so documents "
                   "sharing the query's caption are skipped; 'content' keeps them unless they are the same "
                   "content (same image bytes) - use it on data with repeated captions (default score)")
    p.add_argument("--query-dropout", type=float, default=0.2, help="fraction of query words dropped (default 0.2)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=_run_neighbors)


def _run_neighbors(args: argparse.Namespace) -> int:
    _quiet_faiss()
    from cm3leon.retrieval.encoder import load_encoder
    from cm3leon.retrieval.index import MemoryBank
    from cm3leon.retrieval.neighbors import NEIGHBORS_FILE, compute_neighbors
    from cm3leon.retrieval.retriever import RetrieverConfig

    enc_dir, own_data = _index_sources(args.index, args.encoder, None)
    data = args.data or own_data
    if data is None:
        raise ValueError(f"{args.index} does not record its dataset; pass --data DIR")
    same = not args.other_data
    if same and own_data and args.data and Path(args.data).resolve() != Path(own_data).resolve():
        raise ValueError(f"--data {args.data} is not the dataset the index was built from ({own_data}); "
                         "add --other-data to retrieve for another dataset")
    cfg = RetrieverConfig(k_text=args.k_text, k_image=args.k_image, max_relevance=args.max_relevance,
                          dedup_threshold=args.dedup, query_dropout=args.query_dropout, seed=args.seed,
                          batch_size=args.batch_size, duplicates=args.duplicates)
    bank = MemoryBank.load(args.index)
    out = args.out or str(Path(args.index) / NEIGHBORS_FILE)
    desc = compute_neighbors(
        _open_dataset(data, ["text", "image"]), bank, load_encoder(enc_dir, device=args.device), out,
        cfg=cfg, training=not args.inference, same_bank=same, progress=True, info={"data": str(Path(data).resolve())},
    )
    st = desc["stats"]
    print(json.dumps({"neighbors": out, "n": desc["n"], "k": desc["k"], "fill_rate": round(st["fill_rate"], 4),
                      "mean_relevance": round(st["mean_relevance"], 4), "seconds": st["seconds"]}))
    if st.get("capped_same_caption", 0) >= desc["n"]:
        print(f"warning: the relevance cap skipped {st['capped_same_caption']} candidates that share their query's "
              "exact caption; on data with repeated captions rerun with --duplicates content "
              "(docs/retrieval.md#exact-duplicate-captions)", file=sys.stderr)
    return 0

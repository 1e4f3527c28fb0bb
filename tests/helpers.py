"""Helpers shared by the test modules (``pythonpath = ["tests"]`` in pyproject.toml makes this
module importable from every test folder, and from benchmarks that put ``tests/`` on sys.path).

- Trainer tests: :func:`one_thread`, the synthetic dataset :class:`SynthData` over the small
  vocabulary :data:`VOCAB`, and :func:`tiny_model_config`.
- Pipeline, CLI and server tests: :func:`build_tiny_model_dir`, a tiny random CM3Leon model
  directory (random weights generate random images and text: enough to exercise every task,
  endpoint, the batcher and the web page without a trained model; built with the public
  constructors only: text BPE, VQ-GAN, decoder, in-house retrieval encoder and
  ``CM3Leon.assemble``), :func:`free_port` and :func:`live_server`.
"""

from __future__ import annotations

import contextlib
import io
import socket
import tarfile
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from cm3leon.config import ModelConfig, save_json
from cm3leon.model.io import save_model
from cm3leon.model.transformer import Transformer
from cm3leon.pipeline import CM3Leon
from cm3leon.retrieval.encoder import DualEncoder, DualEncoderConfig, DualEncoderModel
from cm3leon.tokenize.image_vq import ImageTokenizer, VQConfig
from cm3leon.tokenize.text_bpe import TextTokenizer
from cm3leon.vocab import Vocab


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Tiny models run fastest on one thread (and shared cores make extra threads very slow)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


# ---------------------------------------------------------------- trainer tests

VOCAB = Vocab(text_size=20, image_size=16, image_seq_len=8)


def tiny_model_config(**kw: Any) -> ModelConfig:
    """A 2-layer, 32-wide decoder over :data:`VOCAB`; ``kw`` overrides any field."""
    base = dict(vocab_size=VOCAB.size, d_model=32, n_layers=2, n_heads=4, max_seq_len=64)
    base.update(kw)
    return ModelConfig(**base)


class SynthData:
    """``<eos> text <break> IMAGE <pad>...``: the image codes follow from the first text id, so the
    image tokens are learnable from context. ``__getitem__(i)`` depends only on (seed, i)."""

    def __init__(self, n: int = 24, seq_len: int = 24, seed: int = 0, delay: float = 0.0) -> None:
        self.n, self.T, self.seed, self.delay = n, seq_len, seed, delay

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if not 0 <= i < self.n:
            raise IndexError(i)
        if self.delay:
            time.sleep(self.delay)
        v = VOCAB
        g = torch.Generator().manual_seed(self.seed * 100_003 + i)
        k = int(torch.randint(2, 6, (1,), generator=g))
        text = torch.randint(0, v.text_size, (k,), generator=g)
        codes = (text[0] + torch.arange(v.image_seq_len)) % v.image_size
        ids = [v.eos_id, *v.text_to_ids(text.tolist()), v.break_id, *v.codes_to_ids(codes.tolist())][: self.T]
        out = torch.full((self.T,), v.pad_id, dtype=torch.long)
        out[: len(ids)] = torch.tensor(ids)
        labels = out.clone()
        labels[len(ids) :] = -100
        return {"ids": out, "labels": labels}


# ---------------------------------------------------------------- a tiny model directory

TEXTS = [
    "a red circle at the top left",
    "a blue square in the middle",
    "two green triangles at the bottom right",
    "what color is the circle?",
    "make the square yellow",
    "describe the image in very detail",
] * 4


def build_tiny_model_dir(out: str | Path, *, resolution: int = 32, seed: int = 0, encoder: bool = True) -> Path:
    """Write a random tiny model directory to ``out``: ``resolution`` px images of
    ``(resolution / 2) ** 2`` tokens from a 16-code book, the ``tiny`` decoder, and (if
    ``encoder``) a small random retrieval encoder so that re-ranking works."""
    out = Path(out)
    torch.manual_seed(seed)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        tok = TextTokenizer.train(TEXTS, 300)
        tok.save(tmp / "text")
        vq = ImageTokenizer(VQConfig(resolution=resolution, ch=8, ch_mult=(1, 2), num_res_blocks=1,
                                     attn_resolutions=(), z_channels=8, embed_dim=8, codebook_size=16,
                                     num_groups=4))
        vq.save_pretrained(tmp / "image")
        vocab = Vocab(text_size=tok.vocab_size, image_size=16, image_seq_len=vq.tokens_per_image)
        model = Transformer(ModelConfig.from_name("tiny", vocab_size=vocab.size))
        with torch.no_grad():  # the LM head is zero-initialised (paper): give it random weights
            for p in model.parameters():
                p.normal_(0.0, 0.5) if p.ndim == 2 else None
        save_model(model, tmp / "model")
        save_json(vocab.to_dict(), tmp / "model" / "vocab.json")
        enc_dir = None
        if encoder:
            enc_cfg = DualEncoderConfig(vocab_size=tok.vocab_size, dim=16, width=16, text_layers=1, text_heads=2,
                                        max_text_len=16, image_size=16, channels=(8, 16))
            enc_dir = DualEncoder(DualEncoderModel(enc_cfg), tok).save(tmp / "encoder")
        CM3Leon.assemble(out, model_dir=tmp / "model", text_tokenizer_dir=tmp / "text",
                         image_tokenizer_dir=tmp / "image", encoder_dir=enc_dir)
    return out


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def live_server(app: Any) -> Iterator[str]:
    """Run ``app`` with uvicorn on a loopback socket in a thread; yields its base URL."""
    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on", timeout_graceful_shutdown=2))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> None:
    """A tar file (a WebDataset shard) holding ``members`` as (name, bytes) in that order."""
    with tarfile.open(path, "w") as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))


def build_tiny_clip(d: Path, *, layers: int = 1, merges: Sequence[tuple[str, str]] = ()) -> Path:
    """A randomly initialised tiny transformers CLIP (model, tokenizer, image processor) saved in
    ``d`` like a local download: byte-level BPE with ``merges``, 30 px images, ``layers`` per tower."""
    from tokenizers import pre_tokenizers
    from transformers import CLIPConfig, CLIPModel
    from transformers.models.clip.tokenization_clip import CLIPTokenizer

    try:
        from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil as Proc
    except ImportError:  # transformers 4.x
        from transformers import CLIPImageProcessor as Proc

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab: dict[str, int] = {}
    for t in ["<|startoftext|>", "<|endoftext|>", *alphabet, *(c + "</w>" for c in alphabet)]:
        vocab.setdefault(t, len(vocab))
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    tok = CLIPTokenizer(vocab=vocab, merges=list(merges))
    tok.save_pretrained(d)
    Proc(size={"shortest_edge": 30}, crop_size={"height": 30, "width": 30}).save_pretrained(d)
    torch.manual_seed(0)
    cfg = CLIPConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=37, num_hidden_layers=layers,
                         num_attention_heads=4, max_position_embeddings=77, eos_token_id=tok.eos_token_id,
                         bos_token_id=tok.bos_token_id, pad_token_id=tok.pad_token_id),
        vision_config=dict(image_size=30, patch_size=6, hidden_size=32, intermediate_size=37,
                           num_hidden_layers=layers, num_attention_heads=4),
        projection_dim=16,
    )
    CLIPModel(cfg).save_pretrained(d)
    return d

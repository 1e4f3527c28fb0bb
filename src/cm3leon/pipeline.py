"""The one entry point for the CLI, the server and the evaluation harness.

A model directory (like a Hugging Face one) holds everything inference needs::

    model_dir/
      config.json, model.safetensors, vocab.json   the decoder (model/io.py) and its Vocab
                                                   (or model-*.safetensors + model.safetensors.index.json)
      text_tokenizer/                              byte-level BPE (tokenize/text_bpe.py), or a converted
                                                   model's own tokenizer.json (tokenize/text_hf.py)
      image_tokenizer/                             VQ-GAN (tokenize/image_vq.py)
      retrieval/encoder/                           optional: retrieval encoder (retrieval/encoder.py)
      reranker/                                    optional: an encoder for CLIP re-ranking only
                                                   (default: the retrieval encoder)
      retrieval/bank/                              optional: FAISS index + document vectors
      retrieval/memory/                            optional: the bank's documents as token shards
      generation_config.json                       optional: decoding defaults per task (generate/generation_config.py)

``CM3Leon.from_pretrained(dir)`` loads it; every task prompt comes from the SFT template
table (``sequence/sft_templates.py``), so inference prompts are exactly the training sequences with
their answers masked (paper Table 5).
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from cm3leon.config import load_json
from cm3leon.data.records import DocRecord
from cm3leon.data.shards import Shards
from cm3leon.generate.decode import DEFAULT_MIX_CD_K, generate_image_tokens, generate_text, sample_mix
from cm3leon.generate.generation_config import PAPER_DEFAULTS, GenerationConfig, TaskDecoding
from cm3leon.generate.guidance import unconditional_prompt
from cm3leon.generate.logits import SamplingConfig
from cm3leon.generate.rerank import rerank as rerank_images
from cm3leon.model.io import WEIGHTS_INDEX_NAME, load_model
from cm3leon.model.transformer import Transformer
from cm3leon.retrieval.encoder import load_encoder
from cm3leon.retrieval.encoder_base import Encoder
from cm3leon.retrieval.index import MemoryBank
from cm3leon.retrieval.retriever import Retriever, RetrieverConfig
from cm3leon.sequence.document import Document, ImageSegment, TextSegment
from cm3leon.sequence.sft_templates import format_box, render_prompt
from cm3leon.tokenize.image_vq import ImageTokenizer
from cm3leon.tokenize.text_bpe import TextTokenizer
from cm3leon.tokenize.text_hf import HFTextTokenizer, load_text_tokenizer
from cm3leon.vocab import Kind, Vocab

log = logging.getLogger(__name__)

TEXT_TOKENIZER_DIR = "text_tokenizer"
IMAGE_TOKENIZER_DIR = "image_tokenizer"
ENCODER_DIR = "retrieval/encoder"
BANK_DIR = "retrieval/bank"
MEMORY_DIR = "retrieval/memory"
RERANKER_DIR = "reranker"
CONTROL_KINDS = ("edge", "seg", "depth", "hed", "pose", "norm", "scribble")
MAX_PROMPT_CHARS = 2000

ImageLike = Image.Image | str | Path


@dataclass
class GenerationResult:
    """Images of one ``generate_image`` call, best first when re-ranked."""

    images: list[Image.Image]
    codes: torch.Tensor  # Long[n, L] VQ codes, same order as images
    scores: list[float] | None = None  # CLIP scores when re-ranked
    retrieved: list[str] | None = None  # captions of the retrieved documents


def _check_prompt(text: str, what: str = "prompt") -> str:
    if not isinstance(text, str):
        raise ValueError(f"{what} must be a string, got {type(text).__name__}")
    text = text.strip()
    if not text:
        raise ValueError(f"{what} is empty; describe what you want, e.g. 'a red circle at the top left'")
    if len(text) > MAX_PROMPT_CHARS:
        raise ValueError(f"{what} has {len(text)} characters; the limit is {MAX_PROMPT_CHARS}")
    return text


class CM3Leon:
    """A trained CM3Leon: text and image tokenizers, the decoder, and optional retrieval."""

    def __init__(
        self,
        model: Transformer,
        vocab: Vocab,
        text_tokenizer: TextTokenizer | HFTextTokenizer,
        image_tokenizer: ImageTokenizer,
        *,
        encoder: Encoder | None = None,
        bank: MemoryBank | None = None,
        memory: Shards | None = None,
        reranker: Encoder | None = None,
        generation_config: GenerationConfig = PAPER_DEFAULTS,
        device: str | torch.device = "cpu",
    ) -> None:
        if model.cfg.vocab_size != vocab.size:
            raise ValueError(f"model vocab_size {model.cfg.vocab_size} != Vocab.size {vocab.size}; mismatched files")
        if image_tokenizer.tokens_per_image != vocab.image_seq_len or image_tokenizer.codebook_size != vocab.image_size:
            raise ValueError(
                f"image tokenizer makes {image_tokenizer.tokens_per_image} tokens from {image_tokenizer.codebook_size} "
                f"codes but the vocabulary expects {vocab.image_seq_len} from {vocab.image_size}"
            )
        n_text = vocab.text_size if vocab.ids is None else vocab.size  # an id table: tokenizer ids are model ids
        if text_tokenizer.vocab_size > n_text:
            raise ValueError(f"text tokenizer has {text_tokenizer.vocab_size} ids but the vocabulary only {n_text}")
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.vocab = vocab
        self.text_tokenizer = text_tokenizer
        self.image_tokenizer = image_tokenizer.to(self.device).eval()
        self.encoder = encoder
        self.bank = bank
        self.memory = memory
        # A prompt is not a bank document, so no bank document can be its copy: with the bank's
        # content hashes, documents captioned exactly like the prompt are kept ("content" rule;
        # the paper's rule on data without repeated captions, docs/retrieval.md).
        rule = "content" if bank is not None and bank.hashes is not None else "score"
        self.retriever = (
            Retriever(bank, encoder, RetrieverConfig(duplicates=rule)) if bank is not None and encoder is not None
            else None
        )
        # What re-ranks generated images: a dedicated encoder if the directory has one (it can
        # be trained for fine-grained matching without changing what the retriever finds).
        self.reranker = reranker if reranker is not None else encoder
        # Every task's decoding defaults; explicit arguments to the task methods override them.
        self.generation_config = generation_config

    # ---- loading / saving ------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, model_dir: str | Path, *, device: str | torch.device = "cpu") -> CM3Leon:
        """Load every component a model directory holds (retrieval parts are optional)."""
        d = Path(model_dir)
        if not d.is_dir():
            raise FileNotFoundError(f"model directory {d} not found")
        weights = WEIGHTS_INDEX_NAME if (d / WEIGHTS_INDEX_NAME).exists() else "model.safetensors"
        for name in ("config.json", weights, "vocab.json", TEXT_TOKENIZER_DIR, IMAGE_TOKENIZER_DIR):
            if not (d / name).exists():
                raise FileNotFoundError(
                    f"{d / name} is missing; a model directory needs config.json, model.safetensors, vocab.json, "
                    f"{TEXT_TOKENIZER_DIR}/ and {IMAGE_TOKENIZER_DIR}/; build one from trained parts with `cm3leon "
                    "model assemble`, or train one with `cm3leon quickstart --data DIR` (docs/own-data.md)"
                )
        vocab = Vocab.from_dict(load_json(d / "vocab.json"))
        model = load_model(d, device=device)
        text_tok = load_text_tokenizer(d / TEXT_TOKENIZER_DIR)
        image_tok = ImageTokenizer.from_pretrained(d / IMAGE_TOKENIZER_DIR, map_location=device)
        encoder = load_encoder(d / ENCODER_DIR) if (d / ENCODER_DIR).exists() else None
        reranker = load_encoder(d / RERANKER_DIR) if (d / RERANKER_DIR).exists() else None
        bank = memory = None
        if (d / BANK_DIR).exists() and (d / MEMORY_DIR).exists():
            bank = MemoryBank.load(d / BANK_DIR)
            memory = Shards(d / MEMORY_DIR, vocab=vocab)
            if len(memory) != len(bank):
                raise ValueError(
                    f"retrieval memory holds {len(memory)} documents but the index {len(bank)}; "
                    "they come from different builds - rebuild the model directory"
                )
        return cls(model, vocab, text_tok, image_tok, encoder=encoder, bank=bank, memory=memory, reranker=reranker,
                   generation_config=GenerationConfig.load(d), device=device)

    @staticmethod
    def assemble(
        out: str | Path,
        *,
        model_dir: str | Path,
        text_tokenizer_dir: str | Path,
        image_tokenizer_dir: str | Path,
        encoder_dir: str | Path | None = None,
        bank_dir: str | Path | None = None,
        memory_dir: str | Path | None = None,
        reranker_dir: str | Path | None = None,
        generation_config: GenerationConfig | None = None,
    ) -> Path:
        """Copy trained components into one self-contained model directory, with its
        decoding defaults (``generation_config.json``) when given."""
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        for name in ("config.json", "model.safetensors", "vocab.json"):
            shutil.copy2(Path(model_dir) / name, out / name)
        if generation_config is not None:
            generation_config.save(out)
        parts = [(text_tokenizer_dir, TEXT_TOKENIZER_DIR), (image_tokenizer_dir, IMAGE_TOKENIZER_DIR),
                 (encoder_dir, ENCODER_DIR), (bank_dir, BANK_DIR), (memory_dir, MEMORY_DIR),
                 (reranker_dir, RERANKER_DIR)]
        for src, rel in parts:
            if src is None:
                continue
            dst = out / rel
            if dst.exists():
                shutil.rmtree(dst)
            shutil.copytree(src, dst, ignore=shutil.ignore_patterns("checkpoints", "*.tmp", "samples*"))
        return out

    # ---- tokens ----------------------------------------------------------------------
    def text_ids(self, text: str) -> list[int]:
        """Unified ids of a string (user text can never produce control ids)."""
        ids = self.vocab.text_to_ids(self.text_tokenizer.encode(text))
        if self.vocab.ids is not None and set(ids) & set(self.vocab.ids.controls):
            bad = sorted(set(ids) & set(self.vocab.ids.controls))
            raise ValueError(f"the text {text[:40]!r} encodes to control ids {bad} of this model "
                             f"({', '.join(self.vocab.token_name(i) for i in bad)}); remove those token names")
        return ids

    def decode_text(self, ids: Sequence[int]) -> str:
        """String of unified text ids (non-text ids are dropped)."""
        kinds = self.vocab.kinds_tensor(torch.tensor([int(i) for i in ids], dtype=torch.long)).tolist() if ids else []
        return self.text_tokenizer.decode(self.vocab.ids_to_text([int(i) for i, k in zip(ids, kinds) if k == 1]))

    def encode_images(self, images: Sequence[ImageLike]) -> torch.Tensor:
        """VQ codes Long[B, L] of images (paths or PIL; preprocessing policy of the tokenizer)."""
        if not images:
            raise ValueError("no images given")
        with torch.no_grad():
            x = self.image_tokenizer.preprocess(list(images)).to(self.device)
            return self.image_tokenizer.encode(x).cpu()

    def decode_images(self, codes: torch.Tensor) -> list[Image.Image]:
        """PIL images of VQ codes Long[B, L]."""
        with torch.no_grad():
            return self.image_tokenizer.postprocess(self.image_tokenizer.decode(codes.to(self.device)).cpu())

    # ---- retrieval -------------------------------------------------------------------
    def retrieve_batch(self, *, texts: Sequence[str | None], images: Sequence[ImageLike | None] | None = None,
                       k: int = 2) -> list[list[int]]:
        """Per query, ids (rows of the memory) of up to ``k`` documents by the paper's policy."""
        if k <= 0:
            return [[] for _ in texts]
        if self.retriever is None or self.memory is None:
            raise ValueError(
                "this model directory has no retrieval memory (retrieval/encoder, retrieval/bank, retrieval/memory); "
                "use retrieve=0 or build one with `cm3leon index build`"
            )
        imgs = list(images) if images is not None else [None] * len(texts)
        records = [DocRecord(id=f"query-{j}", text=t, image=_open_image(im) if im is not None else None)
                   for j, (t, im) in enumerate(zip(texts, imgs))]
        got = self.retriever.retrieve(records)
        return [[int(i) for i in row if i >= 0][:k] for row in got.ids]

    def retrieve(self, *, text: str | None = None, image: ImageLike | None = None, k: int = 2) -> list[int]:
        """Ids (rows of the memory) of up to ``k`` documents for one query."""
        return self.retrieve_batch(texts=[text], images=[image], k=k)[0]

    def _caption_of(self, doc_id: int) -> str:
        return self.decode_text(self.memory[doc_id])  # type: ignore[index]

    # ---- tasks (batched forms first; the singular methods call them) -------------------
    def defaults(self, task: str, **overrides: Any) -> TaskDecoding:
        """Task ``task``'s decoding settings: the model's ``generation_config.json`` with the
        given (non-None) fields overriding it (``samples`` is the task methods' ``n``)."""
        n = overrides.get("samples")
        if n is not None and (not isinstance(n, int) or n < 1):
            raise ValueError(f"n must be >= 1, got {n!r}")
        return self.generation_config.task(task).replace(**overrides)

    def generate_images(
        self,
        prompts: Sequence[str],
        *,
        n: int | None = None,
        guidance: float | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        top_k: int | None = None,
        cd_k: int | None = None,
        cd_alpha: float | None = None,
        mode: str | None = None,
        retrieve: int | None = None,
        rerank: bool | None = None,
        seed: int = 0,
        callback: Callable[[int, torch.Tensor], None] | None = None,
        callback_every: int = 16,
        jacobi_window: int | None = None,
    ) -> list[GenerationResult]:
        """Text-to-image for a batch of prompts (paper §3), all decoded in one batch.

        Each prompt becomes ``<eos> prompt <break>`` (the ``text_to_image`` template); CFG mixes it with the
        unconditional stream ``<eos> <mask:0> <break>``. Settings left ``None`` come from the model's
        ``generation_config.json`` (``text_to_image``). ``mode``: ``top_p`` (CFG + nucleus), ``cd_k`` (CD-K with
        ``cd_k`` / ``cd_alpha``) or ``mix`` (half each, the paper's sample set); a ``cd_k`` given without a
        ``mode`` selects CD-K. ``retrieve`` prepends 0/1/2 retrieved documents to every stream; ``rerank`` orders
        each prompt's ``n`` samples by CLIP score with ``self.reranker`` (the model directory's ``reranker/``,
        else the retrieval encoder; best first). ``callback(n_done, codes)`` sees the partial codes every
        ``callback_every`` tokens (progressive previews). ``jacobi_window`` > 0 decodes with speculative
        Jacobi decoding (same distribution, fewer forwards; 0 = sequential).
        """
        prompts = [_check_prompt(p) for p in prompts]
        if not prompts:
            raise ValueError("no prompts given")
        if mode is None and cd_k is not None:
            mode = "cd_k"
        d = self.defaults("text_to_image", samples=n, guidance=guidance, temperature=temperature, top_p=top_p,
                          top_k=top_k, cd_k=cd_k, cd_alpha=cd_alpha, mode=mode, retrieve=retrieve, seed=seed,
                          jacobi_window=jacobi_window)
        n, mode, retrieve = d.samples, d.mode, d.retrieve
        if rerank and self.reranker is None:
            raise ValueError("rerank=True needs an encoder in the model directory (reranker/ or retrieval/encoder)")
        rerank = d.rerank and self.reranker is not None if rerank is None else rerank
        cd = d.sampling.cd_k or DEFAULT_MIX_CD_K
        cfg = dataclasses.replace(d.sampling, cd_k=cd if mode == "cd_k" else None)
        ret_ids = self.retrieve_batch(texts=prompts, k=retrieve) if retrieve else [[] for _ in prompts]
        conds, unconds = [], []
        for p, ids in zip(prompts, ret_ids):
            prefix = [t for i in ids for t in self.memory[i]]  # type: ignore[index]
            query, _ = render_prompt("text_to_image", {"caption": p}, self.text_tokenizer, self.vocab)
            conds.append(prefix + query)
            unconds.append(prefix + unconditional_prompt(query, self.vocab))
            self._check_fits(conds[-1], self.vocab.image_seq_len)
        if mode == "mix":
            codes, _ = sample_mix(self.model, self.vocab, conds, dataclasses.replace(cfg, cd_k=d.sampling.cd_k),
                                  n_per_prompt=n, uncond_prompts=unconds, callback=callback,
                                  callback_every=callback_every, jacobi_window=d.jacobi_window)
        else:
            guided = cfg.guidance != 1.0 or cfg.cd_k is not None  # scale 1 without CD-K is plain decoding: one stream
            codes = generate_image_tokens(self.model, self.vocab, conds, cfg,
                                          uncond_prompts=unconds if guided else None, n_per_prompt=n,
                                          callback=callback, callback_every=callback_every,
                                          jacobi_window=d.jacobi_window)
        images = self.decode_images(codes)
        results = []
        for j, p in enumerate(prompts):
            imgs, cds, scores = images[j * n : (j + 1) * n], codes[j * n : (j + 1) * n], None
            if rerank:
                ranking = rerank_images(self.reranker, p, imgs)  # type: ignore[arg-type]
                order = list(ranking.order)
                imgs, cds = [imgs[i] for i in order], cds[order]
                scores = [float(ranking.scores[i]) for i in order]
            retrieved = [self._caption_of(i) for i in ret_ids[j]] or None
            results.append(GenerationResult(imgs, cds, scores, retrieved))
        return results

    def generate_image(self, prompt: str, **kw: Any) -> GenerationResult:
        """Text-to-image for one prompt; keywords as :meth:`generate_images`."""
        return self.generate_images([prompt], **kw)[0]

    def _text_tasks(self, task: str, fields: Sequence[dict[str, Any]], d: TaskDecoding) -> list[str]:
        max_new_tokens = d.max_new_tokens
        prompts = []
        for f in fields:
            ids, kind = render_prompt(task, f, self.text_tokenizer, self.vocab)
            if kind != "text":
                raise ValueError(f"task {task!r} produces {kind}, not text")
            self._check_fits(ids, max_new_tokens)
            prompts.append(ids)
        out = generate_text(self.model, self.vocab, prompts, d.sampling, max_new_tokens=max_new_tokens)
        return [self.decode_text(o).strip() for o in out]

    def _image_tasks(self, task: str, fields: Sequence[dict[str, Any]], cfg: SamplingConfig, *,
                     instruct: bool = False, n: int = 1) -> list[list[Image.Image]]:
        prompts = []
        for f in fields:
            ids, kind = render_prompt(task, f, self.text_tokenizer, self.vocab)
            if kind != "image":
                raise ValueError(f"task {task!r} produces {kind}, not an image")
            self._check_fits(ids, self.vocab.image_seq_len)
            prompts.append(ids)
        codes = generate_image_tokens(self.model, self.vocab, prompts, cfg, instruct=instruct, n_per_prompt=n)
        images = self.decode_images(codes)
        return [images[j * n : (j + 1) * n] for j in range(len(prompts))]

    def _codes_of(self, images: Sequence[ImageLike]) -> list[list[int]]:
        if not images:
            raise ValueError("no images given")
        return self.encode_images([_open_image(i) for i in images]).tolist()

    def captions(self, images: Sequence[ImageLike], *, detailed: bool = False,
                 max_new_tokens: int | None = None) -> list[str]:
        """Describe each image (short, or "in very detail"); decoding from ``generation_config`` (``caption``)."""
        task = "detailed_caption" if detailed else "caption"
        d = self.defaults("caption", max_new_tokens=max_new_tokens)
        return self._text_tasks(task, [{"image": c} for c in self._codes_of(images)], d)

    def caption(self, image: ImageLike, *, detailed: bool = False, max_new_tokens: int | None = None) -> str:
        """Describe an image (short, or "in very detail")."""
        return self.captions([image], detailed=detailed, max_new_tokens=max_new_tokens)[0]

    def answers(self, images: Sequence[ImageLike], questions: Sequence[str], *,
                max_new_tokens: int | None = None) -> list[str]:
        """Answer one question per image (VQA template); decoding from ``generation_config`` (``vqa``)."""
        if len(images) != len(questions):
            raise ValueError(f"got {len(images)} images for {len(questions)} questions")
        questions = [_check_prompt(q, "question") for q in questions]
        fields = [{"image": c, "question": q} for c, q in zip(self._codes_of(images), questions)]
        d = self.defaults("vqa", max_new_tokens=max_new_tokens)
        return [a.rstrip(".").strip() for a in self._text_tasks("vqa", fields, d)]

    def answer(self, image: ImageLike, question: str, *, max_new_tokens: int | None = None) -> str:
        """Answer a question about an image (VQA template)."""
        return self.answers([image], [question], max_new_tokens=max_new_tokens)[0]

    def edits(self, images: Sequence[ImageLike], instructions: Sequence[str], *, image_guidance: float | None = None,
              text_guidance: float | None = None, temperature: float | None = None, top_p: float | None = None,
              n: int | None = None, seed: int = 0) -> list[list[Image.Image]]:
        """Edit each image following its instruction (instruct-CFG over three streams, paper §4.1);
        settings left ``None`` come from ``generation_config`` (``edit``)."""
        if len(images) != len(instructions):
            raise ValueError(f"got {len(images)} images for {len(instructions)} instructions")
        instructions = [_check_prompt(t, "instruction") for t in instructions]
        d = self.defaults("edit", image_guidance=image_guidance, text_guidance=text_guidance, temperature=temperature,
                          top_p=top_p, samples=n, seed=seed)
        fields = [{"source": c, "instruction": t} for c, t in zip(self._codes_of(images), instructions)]
        return self._image_tasks("edit", fields, d.sampling, instruct=True, n=d.samples)

    def edit(self, image: ImageLike, instruction: str, **kw: Any) -> list[Image.Image]:
        """Edit an image following an instruction; keywords as :meth:`edits`."""
        return self.edits([image], [instruction], **kw)[0]

    def controls(self, kind: str, condition_images: Sequence[ImageLike], captions: Sequence[str], *,
                 guidance: float | None = None, temperature: float | None = None, top_p: float | None = None,
                 n: int | None = None, seed: int = 0) -> list[list[Image.Image]]:
        """Images from structure maps (``kind``: edge, seg, depth, ...) and captions; settings left
        ``None`` come from ``generation_config`` (``control``)."""
        if kind not in CONTROL_KINDS:
            raise ValueError(f"unknown control kind {kind!r}; choose one of {CONTROL_KINDS}")
        if len(condition_images) != len(captions):
            raise ValueError(f"got {len(condition_images)} condition images for {len(captions)} captions")
        captions = [_check_prompt(c, "caption") for c in captions]
        d = self.defaults("control", guidance=guidance, temperature=temperature, top_p=top_p, samples=n, seed=seed)
        fields = [{"condition": c, "caption": t} for c, t in zip(self._codes_of(condition_images), captions)]
        return self._image_tasks(f"{kind}_to_image", fields, d.sampling, n=d.samples)

    def control(self, kind: str, condition_image: ImageLike, caption: str, **kw: Any) -> list[Image.Image]:
        """Image from a structure map and a caption; keywords as :meth:`controls`."""
        return self.controls(kind, [condition_image], [caption], **kw)[0]

    def grounds(self, captions: Sequence[str], objects: Sequence[Sequence[tuple[str, Sequence[float]]]], *,
                image_size: int | None = None, guidance: float | None = None, temperature: float | None = None,
                top_p: float | None = None, n: int | None = None, seed: int = 0) -> list[list[Image.Image]]:
        """Spatially grounded generation: per caption, objects = [(name, [x0, y0, x1, y1] in pixels)];
        settings left ``None`` come from ``generation_config`` (``grounding``)."""
        if len(captions) != len(objects):
            raise ValueError(f"got {len(captions)} captions for {len(objects)} object lists")
        size = image_size or self.image_tokenizer.resolution
        fields = []
        for cap, objs in zip(captions, objects):
            if not objs:
                raise ValueError("grounded generation needs at least one (name, box) object per caption")
            text = ", ".join(f"{name} at {format_box(box, size)}" for name, box in objs)
            fields.append({"caption": _check_prompt(cap, "caption"), "objects": text})
        d = self.defaults("grounding", guidance=guidance, temperature=temperature, top_p=top_p, samples=n, seed=seed)
        return self._image_tasks("grounding", fields, d.sampling, n=d.samples)

    def ground(self, caption: str, objects: Sequence[tuple[str, Sequence[float]]], **kw: Any) -> list[Image.Image]:
        """Grounded generation for one caption; keywords as :meth:`grounds`."""
        return self.grounds([caption], [objects], **kw)[0]

    def infill(self, ids: Sequence[int], *, kind: str = "text", max_new_tokens: int = 64,
               sampling: SamplingConfig | None = None) -> list[int]:
        """Generate the span of a CM3 infilling prompt (ids ending with ``<infill>``, or ``<break>`` for images).

        Images in the prompt must be whole (L image ids between separators): a span masked
        out of the middle of an image is refused, because the places of the image tokens
        after it (which training rows carry) cannot be recovered from the ids alone.
        """
        ids = [int(i) for i in ids]
        if not ids:
            raise ValueError("empty infilling prompt")
        L, run = self.vocab.image_seq_len, 0
        for i in [*ids, self.vocab.eos_id]:  # runs of consecutive image ids must be whole images
            if self.vocab.kind(i) is Kind.IMAGE:
                run += 1
                continue
            if run not in (0, L):
                raise ValueError(
                    f"the prompt holds a run of {run} image ids where a whole image has {L}: infilling a span cut "
                    "out of an image is not supported; mask whole images (a <mask:k> in place of the entire image)"
                )
            run = 0
        cfg = sampling or SamplingConfig(greedy=True)
        if kind == "image":
            codes = generate_image_tokens(self.model, self.vocab, [ids], dataclasses.replace(cfg, guidance=1.0))
            return self.vocab.codes_to_ids(codes[0].tolist())
        if kind != "text":
            raise ValueError(f"kind must be 'text' or 'image', got {kind!r}")
        return generate_text(self.model, self.vocab, [ids], cfg, max_new_tokens=max_new_tokens)[0]

    def complete_text(self, prompt: str, *, max_new_tokens: int = 64, temperature: float = 1.0,
                      greedy: bool = True, seed: int = 0) -> str:
        """Continue a text document (``<eos> prompt`` ...) until ``<eos>``/``<break>``."""
        prompt = _check_prompt(prompt)
        ids = [self.vocab.eos_id, *self.text_ids(prompt)]
        self._check_fits(ids, max_new_tokens)
        cfg = SamplingConfig(greedy=greedy, temperature=temperature, seed=seed)
        return self.decode_text(generate_text(self.model, self.vocab, [ids], cfg, max_new_tokens=max_new_tokens)[0])

    def interleaved(self, parts: Sequence[str | Image.Image | Path], *, output: str = "text", n: int | None = None,
                    guidance: float | None = None, temperature: float | None = None, top_p: float | None = None,
                    max_new_tokens: int | None = None, seed: int = 0) -> str | list[Image.Image]:
        """Continue an interleaved prompt: text (``str``) and images (PIL images or ``Path``) in any order.

        ``parts`` are one document (``<eos> text <break> IMAGE <break> text``; a converted model:
        ``<s> text <begin-image> IMAGE <end-image> text``). ``output="image"`` writes the next image
        (``n`` samples, CFG against the prompt with its text masked / left out; settings from
        ``text_to_image``); ``output="text"`` writes the text that follows, a new segment after an image
        or the last text's continuation (settings from ``caption``).
        """
        if not parts:
            raise ValueError("no prompt parts given")
        images = [x for x in parts if not isinstance(x, str)]
        codes = iter(self._codes_of(images) if images else [])
        segs: list[Any] = []
        for x in parts:
            if isinstance(x, str):
                ids = self.text_ids(_check_prompt(x, "text part"))
                segs.append(TextSegment(tuple(self.vocab.ids_to_text(ids))))
            else:
                segs.append(ImageSegment(tuple(next(codes))))
        doc = Document(tuple(segs)).to_ids(self.vocab)
        if output == "image":
            d = self.defaults("text_to_image", samples=n, guidance=guidance, temperature=temperature, top_p=top_p,
                              seed=seed)
            prompt = doc + self.vocab.segment_prefix(Kind.IMAGE, first=False)
            self._check_fits(prompt, self.vocab.image_seq_len)
            cfg = dataclasses.replace(d.sampling, cd_k=None)
            uncond = [unconditional_prompt(prompt, self.vocab)] if cfg.guidance != 1.0 else None
            out = generate_image_tokens(self.model, self.vocab, [prompt], cfg, uncond_prompts=uncond,
                                        n_per_prompt=d.samples)
            return self.decode_images(out)
        if output != "text":
            raise ValueError(f"output must be 'text' or 'image', got {output!r}")
        d = self.defaults("caption", max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed)
        after_image = not isinstance(parts[-1], str)  # a new text segment; after text, the text goes on
        prompt = doc + (self.vocab.segment_prefix(Kind.TEXT, first=False) if after_image else [])
        self._check_fits(prompt, d.max_new_tokens)
        out = generate_text(self.model, self.vocab, [prompt], d.sampling, max_new_tokens=d.max_new_tokens)
        return self.decode_text(out[0]).strip()

    def _check_fits(self, ids: Sequence[int], n_new: int) -> None:
        limit = self.model.cfg.max_seq_len
        if len(ids) + n_new > limit:
            raise ValueError(
                f"prompt of {len(ids)} tokens + {n_new} to generate exceeds the model's context of {limit}; "
                "shorten the prompt or retrieve fewer documents (prompts are never truncated silently)"
            )


def _open_image(image: ImageLike) -> Image.Image:
    """A PIL image from a PIL image or a path, with a clear error for unreadable files."""
    if isinstance(image, Image.Image):
        return image
    path = Path(image)
    if not path.exists():
        raise FileNotFoundError(f"image {path} not found")
    try:
        from cm3leon.tokenize.image_vq_preprocess import open_image

        return open_image(path)
    except ValueError:
        raise
    except Exception as e:  # PIL raises many types for undecodable files
        raise ValueError(f"{path} is not a readable image ({e}); use PNG/JPEG/WebP") from e

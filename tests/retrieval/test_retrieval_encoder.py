"""Encoders: real CLIP through transformers (tiny random model saved to disk) and the in-house one."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from cm3leon.data.records import DocRecord
from cm3leon.retrieval.clip_hf import CLIPEncoder
from cm3leon.retrieval.encoder import (
    DualEncoder,
    DualEncoderConfig,
    DualEncoderModel,
    EncoderTrainConfig,
    contrastive_loss,
    load_encoder,
    text_to_image_recall,
    train_dual_encoder,
)
from cm3leon.tokenize.text_bpe import TextTokenizer
from helpers import build_tiny_clip

pytestmark = pytest.mark.usefixtures("one_torch_thread")


TEXTS = ["a red circle", "two blue squares and a green triangle", "an orange diamond", "x", "purple"]


def random_images(n: int, size: tuple[int, int] = (40, 36), seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)) for _ in range(n)]


@pytest.fixture(scope="module")
def tiny_clip_dir(tmp_path_factory):
    """A randomly initialized tiny CLIP + tokenizer + image processor, saved like a hub download."""
    return build_tiny_clip(tmp_path_factory.mktemp("tiny_clip"), layers=2,
                           merges=[("r", "e"), ("re", "d</w>"), ("c", "i"), ("ci", "r")])


def reference_clip(d):
    """Independent reference: the saved model run by hand (towers -> pooled -> projection)."""
    from transformers import AutoTokenizer, CLIPModel

    model = CLIPModel.from_pretrained(d, local_files_only=True).eval()
    tok = AutoTokenizer.from_pretrained(d, local_files_only=True)
    return model, tok


def test_clip_text_embeddings_match_the_model(tiny_clip_dir):
    enc = load_encoder(tiny_clip_dir)  # a plain transformers directory, no encoder.json
    assert isinstance(enc, CLIPEncoder) and enc.dim == 16
    got = enc.embed_text(TEXTS)
    model, tok = reference_clip(tiny_clip_dir)
    with torch.no_grad():
        for i, t in enumerate(TEXTS):  # one at a time: no padding involved
            ids = tok(t, return_tensors="pt")["input_ids"]
            pooled = model.text_model(input_ids=ids).pooler_output
            ref = F.normalize(model.text_projection(pooled), dim=-1)[0].numpy()
            np.testing.assert_allclose(got[i], ref, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)


def test_clip_image_embeddings_match_the_model_and_batching(tiny_clip_dir):
    from transformers import AutoImageProcessor

    enc = CLIPEncoder.from_pretrained(tiny_clip_dir, batch_size=2)
    imgs = random_images(5)
    got = enc.embed_image(imgs)
    model, _ = reference_clip(tiny_clip_dir)
    proc = AutoImageProcessor.from_pretrained(tiny_clip_dir, local_files_only=True)
    with torch.no_grad():
        px = proc(images=imgs, return_tensors="pt")["pixel_values"]
        feats = model.get_image_features(pixel_values=px)
        feats = feats if isinstance(feats, torch.Tensor) else feats.pooler_output
        ref = F.normalize(feats, dim=-1).numpy()
        manual = F.normalize(model.visual_projection(model.vision_model(pixel_values=px).pooler_output), dim=-1)
    np.testing.assert_allclose(got, ref, atol=1e-5)
    np.testing.assert_allclose(got, manual.numpy(), atol=1e-5)
    # text batching (with padding) gives the same vectors as one-by-one
    np.testing.assert_allclose(enc.embed_text(TEXTS), np.concatenate([enc.embed_text([t]) for t in TEXTS]), atol=1e-5)


def test_document_vector_is_mean_of_normalized_parts(tiny_clip_dir):
    enc = CLIPEncoder.from_pretrained(tiny_clip_dir)
    imgs = random_images(3, seed=1)
    recs = [DocRecord("a", TEXTS[0], imgs[0]), DocRecord("b", TEXTS[1], None), DocRecord("c", None, imgs[2])]
    docs = enc.embed_documents(recs)
    t, v = enc.embed_text([TEXTS[0], TEXTS[1]]), enc.embed_image([imgs[0], imgs[2]])
    both = t[0] + v[0]
    np.testing.assert_allclose(docs[0], both / np.linalg.norm(both), atol=1e-5)
    np.testing.assert_allclose(docs[1], t[1], atol=1e-5)
    np.testing.assert_allclose(docs[2], v[1], atol=1e-5)
    with pytest.raises(ValueError, match="neither text nor image"):
        enc.embed_documents([DocRecord("e")])


def test_clip_encoder_save_and_load(tiny_clip_dir, tmp_path):
    enc = CLIPEncoder.from_pretrained(tiny_clip_dir)
    enc.save(tmp_path / "copy")
    spec = json.loads((tmp_path / "copy" / "encoder.json").read_text())
    assert spec["type"] == "clip" and spec["dim"] == 16
    assert (tmp_path / "copy" / "model.safetensors").exists()
    enc.save(tmp_path / "ref", copy_weights=False)
    for d in ("copy", "ref"):
        back = load_encoder(tmp_path / d)
        np.testing.assert_allclose(back.embed_text(TEXTS), enc.embed_text(TEXTS), atol=1e-6)


def test_missing_clip_is_a_clear_error_and_never_downloads(tmp_path):
    with pytest.raises(FileNotFoundError, match="not available locally"):
        CLIPEncoder.from_pretrained("openai/definitely-not-cached-clip")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_encoder(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="encoder.json"):
        load_encoder(tmp_path / "empty")


# ---- in-house encoder ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def tok():
    return TextTokenizer.train(TEXTS * 4, 300)


def tiny_dual(tok) -> DualEncoder:
    torch.manual_seed(0)
    cfg = DualEncoderConfig(vocab_size=tok.vocab_size, dim=16, width=32, text_layers=1, channels=(8, 16),
                            image_size=16, max_text_len=12)
    return DualEncoder(DualEncoderModel(cfg), tok)


def test_dual_encoder_outputs_unit_vectors_and_round_trips(tok, tmp_path):
    enc = tiny_dual(tok)
    imgs = random_images(4, size=(16, 16))
    t, v = enc.embed_text(TEXTS), enc.embed_image(imgs)
    assert t.shape == (5, 16) and v.shape == (4, 16) and t.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(t, axis=1), 1.0, atol=1e-5)
    # batch composition does not change a text's vector (padding is masked out)
    np.testing.assert_allclose(t[0], enc.embed_text(TEXTS[:1])[0], atol=1e-5)
    enc.save(tmp_path / "enc")
    back = load_encoder(tmp_path / "enc")
    assert isinstance(back, DualEncoder) and back.cfg == enc.cfg
    np.testing.assert_allclose(back.embed_text(TEXTS), t, atol=1e-6)
    np.testing.assert_allclose(back.embed_image(imgs), v, atol=1e-6)


def test_dual_encoder_load_rejects_mismatched_weights(tok, tmp_path):
    enc = tiny_dual(tok)
    enc.save(tmp_path / "enc")
    spec = json.loads((tmp_path / "enc" / "encoder.json").read_text())
    spec["config"]["dim"] = 32
    (tmp_path / "enc" / "encoder.json").write_text(json.dumps(spec))
    with pytest.raises(ValueError, match="does not match the encoder config"):
        load_encoder(tmp_path / "enc")


def test_encoders_saved_before_the_spatial_map_still_load(tok, tmp_path):
    torch.manual_seed(0)
    cfg = DualEncoderConfig(vocab_size=tok.vocab_size, dim=16, width=32, text_layers=1, channels=(8, 16),
                            image_size=16, max_text_len=12, spatial_grid=0)
    enc = DualEncoder(DualEncoderModel(cfg), tok)
    enc.save(tmp_path / "enc")
    spec = json.loads((tmp_path / "enc" / "encoder.json").read_text())
    del spec["config"]["spatial_grid"]  # an encoder.json written before the field existed
    (tmp_path / "enc" / "encoder.json").write_text(json.dumps(spec))
    back = load_encoder(tmp_path / "enc")
    assert back.cfg.spatial_grid == 0
    imgs = random_images(3, size=(16, 16))
    np.testing.assert_allclose(back.embed_image(imgs), enc.embed_image(imgs), atol=1e-6)
    # the spatial map adds C * g^2 inputs to the image head
    with_map = DualEncoderModel(dataclasses.replace(cfg, spatial_grid=3))
    assert with_map.image.head[0].in_features == (2 + 9) * 16
    with pytest.raises(ValueError, match="spatial_grid"):
        dataclasses.replace(cfg, spatial_grid=-1)


def test_contrastive_loss_equals_symmetric_cross_entropy():
    g = torch.Generator().manual_seed(0)
    t = F.normalize(torch.randn(6, 8, generator=g), dim=-1)
    v = F.normalize(torch.randn(6, 8, generator=g), dim=-1)
    scale = torch.tensor(np.log(10.0))
    logits = 10.0 * t @ v.T
    ref = 0.5 * (F.cross_entropy(logits, torch.arange(6)) + F.cross_entropy(logits.T, torch.arange(6)))
    torch.testing.assert_close(contrastive_loss(t, v, scale), ref)
    # marking pair (0, 1) positive removes it from the negatives of row 0 and column 1
    pos = torch.zeros(6, 6, dtype=torch.bool)
    pos[0, 1] = pos[1, 0] = True
    row0 = torch.logsumexp(logits[0], 0) - torch.logsumexp(logits[0, :2], 0)
    assert contrastive_loss(t, v, scale, pos) < contrastive_loss(t, v, scale)
    lg = logits.masked_fill(~(pos | torch.eye(6, dtype=torch.bool)), float("-inf"))
    per_row = torch.logsumexp(logits, 1) - torch.logsumexp(lg, 1)
    torch.testing.assert_close(per_row[0], row0)


def test_contrastive_loss_with_hard_negatives_adds_image_to_text_columns():
    g = torch.Generator().manual_seed(1)
    t = F.normalize(torch.randn(5, 8, generator=g), dim=-1)
    v = F.normalize(torch.randn(5, 8, generator=g), dim=-1)
    h = F.normalize(torch.randn(3, 8, generator=g), dim=-1)
    scale = torch.tensor(np.log(10.0))
    logits = 10.0 * t @ v.T  # row = text
    i2t = torch.cat([logits.T, 10.0 * v @ h.T], 1)  # row = image: its 5 captions, then the 3 negatives
    ref = 0.5 * (F.cross_entropy(logits, torch.arange(5)) + F.cross_entropy(i2t, torch.arange(5)))
    torch.testing.assert_close(contrastive_loss(t, v, scale, hard_negatives=h), ref)
    assert contrastive_loss(t, v, scale, hard_negatives=h) > contrastive_loss(t, v, scale)
    torch.testing.assert_close(contrastive_loss(t, v, scale, hard_negatives=h[:0]), contrastive_loss(t, v, scale))


def test_token_init_std_sets_the_token_embedding_scale():
    tok = TextTokenizer.train(TEXTS * 4, 300)
    cfg = DualEncoderConfig(vocab_size=tok.vocab_size, dim=16, width=32, text_layers=1)
    assert abs(DualEncoderModel(cfg).text.tok.weight[:-1].std().item() - 1.0) < 0.1  # nn.Embedding default
    w = DualEncoderModel(dataclasses.replace(cfg, token_init_std=0.02)).text.tok.weight
    assert abs(w[:-1].std().item() - 0.02) < 0.005 and w[-1].abs().max() == 0  # pad row stays zero
    with pytest.raises(ValueError, match="token_init_std"):
        dataclasses.replace(cfg, token_init_std=0.0)


def test_training_with_hard_negatives_records_them_and_checks_lengths():
    from cm3leon.shapes.captions import hard_negative_captions
    from cm3leon.shapes.dataset import iter_examples

    recs = list(iter_examples(48, seed=3))
    texts = [r.meta["captions"]["detailed"] for r in recs]
    tok = TextTokenizer.train(texts, 300)
    rng = np.random.default_rng(0)
    negs = [hard_negative_captions(t, rng, 2) for t in texts]
    negs[0] = []  # a pair without negatives is fine
    cfg = DualEncoderConfig(vocab_size=tok.vocab_size, dim=32, width=32, text_layers=1, channels=(8, 16))
    tc = EncoderTrainConfig(steps=6, batch_size=16, warmup=1)
    enc = train_dual_encoder(texts, [r.image for r in recs], tokenizer=tok, cfg=cfg, train_cfg=tc, negatives=negs)
    assert enc.info["train"]["hard_negatives"] == sum(len(n) for n in negs) > 0
    with pytest.raises(ValueError, match="one list per pair"):
        train_dual_encoder(texts, [r.image for r in recs], tokenizer=tok, cfg=cfg, train_cfg=tc, negatives=negs[:-1])


def test_recall_counts_relevant_keys():
    t = np.eye(3, dtype=np.float32)
    v = np.eye(3, dtype=np.float32)[[1, 0, 2]]  # image i sits at the direction of text perm[i]
    assert text_to_image_recall(t, v, [0, 1, 2], ks=(1,)) == {"recall@1": pytest.approx(1 / 3)}
    assert text_to_image_recall(t, v, ["a", "a", "b"], ks=(1,)) == {"recall@1": 1.0}
    assert text_to_image_recall(t, v, [0, 1, 2], ks=(2,))["recall@2"] == 1.0


def test_training_smoke_on_shapes(tmp_path):
    from cm3leon.shapes.dataset import iter_examples

    recs = list(iter_examples(64, seed=5))
    tok = TextTokenizer.train([r.text for r in recs], 300)
    cfg = DualEncoderConfig(vocab_size=tok.vocab_size, dim=32, width=32, text_layers=1, channels=(8, 16))
    enc = train_dual_encoder([r.text for r in recs], [r.image for r in recs], tokenizer=tok, cfg=cfg,
                             train_cfg=EncoderTrainConfig(steps=20, batch_size=32, warmup=2))
    info = enc.info["train"]
    assert info["final_loss"] < info["first_loss"] - 0.3
    enc.save(tmp_path / "enc")
    assert load_encoder(tmp_path / "enc").embed_text(["a red circle"]).shape == (1, 32)
    with pytest.raises(ValueError, match="captions for"):
        train_dual_encoder(["a"], [], tokenizer=tok)


def shapes_pairs(n: int, seed: int):
    """Caption, image and (shape, color) multiset of ``n`` Shapes scenes."""
    from cm3leon.shapes.captions import describe
    from cm3leon.shapes.render import render
    from cm3leon.shapes.world import ShapesConfig, sample_scene

    rng, cfg = np.random.default_rng(seed), ShapesConfig(size=32)
    out = []
    for _ in range(n):
        scene = sample_scene(rng, cfg)
        out.append((describe(scene), render(scene, cfg), tuple(sorted((o.shape, o.color) for o in scene.objects))))
    return out


@pytest.mark.slow
def test_default_training_retrieves_well_on_held_out_shapes():
    """The acceptance bar: held-out text->image recall@1 >= 0.6 and recall@10 >= 0.9 over 1000
    documents, relevant = same multiset of (shape, color), with the default training recipe."""
    import time

    train, held_out = shapes_pairs(11_000, seed=100), shapes_pairs(1000, seed=200)
    tok = TextTokenizer.train([t for t, _, _ in train], 512)
    c0 = time.process_time()
    enc = train_dual_encoder([t for t, _, _ in train], [i for _, i, _ in train], tokenizer=tok)
    cpu = time.process_time() - c0
    rec = text_to_image_recall(enc.embed_text([t for t, _, _ in held_out]),
                               enc.embed_image([i for _, i, _ in held_out]), [k for _, _, k in held_out])
    print(f"held-out recall {rec}, training {cpu:.0f} CPU s")
    assert rec["recall@1"] >= 0.6 and rec["recall@10"] >= 0.9
    assert cpu < 300

"""The chameleon family against transformers: a tiny random ChameleonForConditionalGeneration saved with
save_pretrained (sharded) + a tiny tokenizer, converted with convert_chameleon, gives the same logits
id for id (both swin_norm settings, and grouped-query attention), cached decoding equals the full
forward, and greedy text equals HF generate."""

from __future__ import annotations

import pytest
import torch
from chameleon_fixtures import build_checkpoint

from cm3leon.config import load_json
from cm3leon.convert import convert_chameleon
from cm3leon.generate.decode import generate_text
from cm3leon.generate.logits import SamplingConfig
from cm3leon.model.io import load_model, weight_files
from cm3leon.model.kv_cache import KVCache, decode_one_token, prefill
from cm3leon.vocab import Kind, Vocab


@pytest.fixture(scope="module", params=[(False, 4), (True, 4), (False, 2)], ids=["pre-norm", "swin-norm", "gqa"])
def converted(request, tmp_path_factory, one_torch_thread):
    swin, n_kv = request.param
    d = tmp_path_factory.mktemp("hf")
    hf = build_checkpoint(d, swin_norm=swin, n_kv=n_kv)
    out = convert_chameleon(d, tmp_path_factory.mktemp("ours"))
    return hf, load_model(out).eval(), Vocab.from_dict(load_json(out / "vocab.json")), out


def _ids(vocab: Vocab, T: int = 14, B: int = 2) -> torch.Tensor:
    """Random documents touching every kind of id: text, image ids, the markers."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab.size, (B, T), generator=g)
    ids[:, 0] = vocab.eos_id
    ids[:, 3] = vocab.break_id
    ids[:, 4:8] = vocab.codes_to_ids(torch.tensor([3, 0, 15, 7]))
    ids[:, 8] = vocab.end_image_id
    return ids


def _hf_logits(hf, ids: torch.Tensor) -> torch.Tensor:
    """HF's logits before its suppression of image ids: the LM head on the decoder's output."""
    with torch.no_grad():
        return hf.lm_head(hf.model(input_ids=ids).last_hidden_state)


def test_logits_equal_transformers(converted):
    hf, ours, vocab, _ = converted
    ids = _ids(vocab)
    with torch.no_grad():
        got = ours(ids)
        suppressed = hf(input_ids=ids).logits
    torch.testing.assert_close(got, _hf_logits(hf, ids), rtol=1e-5, atol=1e-5)
    text = ~vocab.image_mask()  # where HF does not suppress, its own output compares directly
    torch.testing.assert_close(got[..., text], suppressed[..., text], rtol=1e-5, atol=1e-5)
    assert (got.argmax(-1) == _hf_logits(hf, ids).argmax(-1)).all()


def test_cached_decoding_equals_full_forward(converted):
    _, model, vocab, _ = converted
    ids = _ids(vocab, T=12)
    with torch.no_grad():
        full = model(ids)
        cache = KVCache.allocate(model.cfg, ids.shape[0], ids.shape[1])
        valid = torch.ones(ids.shape[0], 5, dtype=torch.bool)
        steps = [prefill(model, ids[:, :5], valid, cache)]
        for t in range(5, ids.shape[1]):
            steps.append(decode_one_token(model, ids[:, t : t + 1], cache)[:, None])
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-5, atol=1e-5)


def test_greedy_text_equals_hf_generate(converted):
    hf, model, vocab, _ = converted
    prompt = [vocab.eos_id, *range(40, 46)]
    ours = generate_text(model, vocab, [prompt], SamplingConfig(greedy=True), max_new_tokens=12)[0]
    # HF with the same rules: stop ids end the text, ids that are neither text nor a stop are never picked.
    banned = [i for i in range(vocab.size) if vocab.kind(i) is not Kind.TEXT and i not in vocab.stop_ids]
    with torch.no_grad():
        out = hf.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False, eos_token_id=list(vocab.stop_ids),
                          pad_token_id=vocab.pad_id, suppress_tokens=banned)[0, len(prompt):].tolist()
    cut = next((k for k, t in enumerate(out) if t in vocab.stop_ids), len(out))
    assert ours == out[:cut] and len(ours) > 0


def test_converted_directory(converted):
    hf, model, vocab, out = converted
    assert len(weight_files(out)) > 1  # sharded like the checkpoint, one shard in memory at a time
    assert model.cfg.family == "chameleon" and model.cfg.swin_norm == hf.config.swin_norm
    assert vocab.size == hf.config.vocab_size and vocab.image_seq_len == 16
    vm = hf.config.vocabulary_map
    assert (vocab.eos_id, vocab.break_id, vocab.end_image_id) == (vm["<s>"], vm["<racm3:break>"], vm["<eoss>"])
    # image ids follow transformers' ChameleonImageVocabularyMapping: code order is not id order
    mapping = hf.model.vocabulary_mapping
    assert [vocab.codes_to_ids([c])[0] for c in range(16)] == [mapping.img2bpe[c] for c in range(16)]
    assert vocab.codes_to_ids(list(range(16))) != sorted(vocab.codes_to_ids(list(range(16))))
    assert vocab.kind(vm["<reserved0000>"]) is Kind.SPECIAL and vocab.kind(vm["w3"]) is Kind.TEXT
    gen = load_json(out / "generation_config.json")["text_to_image"]
    assert (gen["guidance"], gen["temperature"], gen["top_p"]) == (3.0, 0.7, 0.9)

"""Static KV cache: prefill + decode_one_token must reproduce the full forward exactly."""

from __future__ import annotations

import pytest
import torch

from cm3leon.config import ModelConfig
from cm3leon.model.kv_cache import KVCache, decode_one_token, prefill
from cm3leon.model.transformer import Transformer, image_index

V = 101


def randomized(seed: int = 0, **kw) -> Transformer:
    base = dict(d_model=32, n_layers=3, n_heads=4, max_seq_len=64)
    base.update(kw)
    torch.manual_seed(seed)
    m = Transformer(ModelConfig(vocab_size=V, **base)).eval()
    with torch.no_grad():
        m.lm_head.weight.normal_(std=0.05)
        m.pos_emb.weight.normal_(std=0.05)
    return m


def left_pad(prompts: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    T = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), T, dtype=torch.long)
    valid = torch.zeros(len(prompts), T, dtype=torch.bool)
    for i, p in enumerate(prompts):
        ids[i, T - len(p) :] = p
        valid[i, T - len(p) :] = True
    return ids, valid


def cached_logits(model, prompts, continuations, max_len) -> list[torch.Tensor]:
    """Per row: next-token logits after the prompt and after each fed continuation token."""
    ids, valid = left_pad(prompts)
    cache = KVCache.allocate(model.cfg, len(prompts), max_len)
    steps = [prefill(model, ids, valid, cache)[:, -1]]
    for j in range(continuations.shape[1]):
        steps.append(decode_one_token(model, continuations[:, j : j + 1], cache))
    return [torch.stack([s[i] for s in steps]) for i in range(len(prompts))]


@pytest.mark.parametrize("activation", ["relu", "gelu"])
@torch.no_grad()
def test_cached_decoding_equals_full_forward_per_row(activation):
    model = randomized(activation=activation)
    torch.manual_seed(1)
    lens, n_new = [7, 2, 12, 1], 9
    prompts = [torch.randint(4, V, (n,)) for n in lens]
    cont = torch.randint(4, V, (len(lens), n_new))
    got = cached_logits(model, prompts, cont, max_len=max(lens) + n_new + 3)
    for i, p in enumerate(prompts):
        full = model(torch.cat([p, cont[i]])[None])[0]  # the row alone, no padding
        want = full[len(p) - 1 :]  # logits after the prompt, then after each continuation token
        torch.testing.assert_close(got[i], want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("static", [False, True])
@torch.no_grad()
def test_head_window_gives_the_slice_of_the_full_logits(static):
    """Decoding inside one modality computes only that window of the LM head: same numbers."""
    model = randomized()
    ids, valid = left_pad([torch.randint(4, V, (n,)) for n in (5, 9)])
    full_cache = KVCache.allocate(model.cfg, 2, 16, static=static)
    win_cache = KVCache.allocate(model.cfg, 2, 16, static=static)
    full = [prefill(model, ids, valid, full_cache, last_only=True)[:, -1]]
    win = [prefill(model, ids, valid, win_cache, last_only=True, head_window=(40, 90))[:, -1]]
    for t in torch.randint(4, V, (4, 2, 1)):
        full.append(decode_one_token(model, t, full_cache))
        win.append(decode_one_token(model, t, win_cache, head_window=(40, 90)))
    for f, w in zip(full, win):
        assert w.shape == (2, 50)
        torch.testing.assert_close(w, f[:, 40:90], atol=1e-6, rtol=0)


@torch.no_grad()
def test_prefill_logits_equal_padded_forward():
    model = randomized()
    ids, valid = left_pad([torch.randint(4, V, (n,)) for n in (5, 9, 3)])
    cache = KVCache.allocate(model.cfg, 3, 16)
    from cm3leon.model.transformer import positions_from_valid

    full = model(ids, positions_from_valid(valid), key_valid=valid)
    out = prefill(model, ids, valid, cache)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[valid], full[valid], atol=1e-5, rtol=0)
    assert cache.pos.tolist() == [5, 9, 3]
    assert cache.length == 9


@torch.no_grad()
def test_cache_reuse_after_prefill_resets_state():
    model = randomized()
    torch.manual_seed(2)
    first = [torch.randint(4, V, (n,)) for n in (6, 3)]
    second = [torch.randint(4, V, (n,)) for n in (2, 5)]
    cont = torch.randint(4, V, (2, 4))
    fresh = cached_logits(model, second, cont, max_len=12)
    # Same cache object: run a first batch to the end, then the second batch.
    cache = KVCache.allocate(model.cfg, 2, 12)
    ids, valid = left_pad(first)
    prefill(model, ids, valid, cache)
    for _ in range(5):
        decode_one_token(model, torch.randint(4, V, (2, 1)), cache)
    ids, valid = left_pad(second)
    steps = [prefill(model, ids, valid, cache)[:, -1]]
    for j in range(4):
        steps.append(decode_one_token(model, cont[:, j : j + 1], cache))
    for i in range(2):
        torch.testing.assert_close(torch.stack([s[i] for s in steps]), fresh[i], atol=0, rtol=0)


@torch.no_grad()
def test_model_is_not_mutated_and_cache_is_a_separate_module():
    model = randomized()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cache = KVCache.allocate(model.cfg, 2, 10)
    ids, valid = left_pad([torch.randint(4, V, (n,)) for n in (3, 4)])
    prefill(model, ids, valid, cache)
    decode_one_token(model, ids[:, -1:], cache)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert not list(model.buffers())
    assert {n for n, _ in cache.named_buffers()} == {"k", "v", "valid", "pos", "slot", "image_idx"}
    assert cache.k.shape == (3, 2, 4, 10, 8)


@torch.no_grad()
def test_bf16_cache_tracks_fp32_forward():
    model = randomized()
    prompts = [torch.randint(4, V, (n,)) for n in (4, 6)]
    cont = torch.randint(4, V, (2, 3))
    ids, valid = left_pad(prompts)
    cache = KVCache.allocate(model.cfg, 2, 12, dtype=torch.bfloat16)
    assert cache.k.dtype == torch.bfloat16
    steps = [prefill(model, ids, valid, cache)[:, -1]]
    steps += [decode_one_token(model, cont[:, j : j + 1], cache) for j in range(3)]
    for i, p in enumerate(prompts):
        want = model(torch.cat([p, cont[i]])[None])[0, len(p) - 1 :]
        got = torch.stack([s[i] for s in steps])
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, want, atol=2e-2, rtol=0)


def test_bad_usage_raises_clear_errors():
    model = randomized()
    with pytest.raises(ValueError, match="max_len=65"):
        KVCache.allocate(model.cfg, 1, 65)
    cache = KVCache.allocate(model.cfg, 2, 6)
    ids, valid = left_pad([torch.randint(4, V, (n,)) for n in (4, 5)])
    with pytest.raises(ValueError, match="allocated for 2"):
        prefill(model, ids[:1], valid[:1], cache)
    with pytest.raises(ValueError, match="Bool"):
        prefill(model, ids, valid.long(), cache)
    with pytest.raises(ValueError, match="exceeds the cache's max_len=6"):
        prefill(model, torch.zeros(2, 7, dtype=torch.long), torch.ones(2, 7, dtype=torch.bool), cache)
    with torch.no_grad():
        prefill(model, ids, valid, cache)
        decode_one_token(model, ids[:, -1:], cache)
        with pytest.raises(ValueError, match=r"must be \[2, 1\]"):
            decode_one_token(model, ids[:, -2:], cache)
        with pytest.raises(ValueError, match="cache is full"):
            decode_one_token(model, ids[:, -1:], cache)


@pytest.mark.slow
@torch.no_grad()
def test_compiled_decode_matches_eager_without_recompiling():
    model = randomized()
    prompts = [torch.randint(4, V, (n,)) for n in (5, 8)]
    cont = torch.randint(4, V, (2, 6))
    eager = cached_logits(model, prompts, cont, max_len=20)
    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    counters.clear()
    step = torch.compile(decode_one_token, fullgraph=True)
    ids, valid = left_pad(prompts)
    cache = KVCache.allocate(model.cfg, 2, 20)
    steps = [prefill(model, ids, valid, cache)[:, -1]]
    steps += [step(model, cont[:, j : j + 1], cache) for j in range(6)]
    for i in range(2):
        torch.testing.assert_close(torch.stack([s[i] for s in steps]), eager[i], atol=1e-5, rtol=0)
    assert counters["stats"]["unique_graphs"] == 1


def test_image_index_hand_example():
    from cm3leon.model.transformer import image_index

    ids = torch.tensor([[0, 5, 60, 61, 62, 63, 2, 64, 60, 7]])
    assert image_index(ids, 60, 3).tolist() == [[-1, -1, 0, 1, 2, 0, -1, 0, 1, -1]]


@pytest.mark.parametrize("static", [False, True])
@pytest.mark.parametrize("axial", [False, True])
@torch.no_grad()
def test_image_position_embedding_cached_equals_full_forward(static, axial):
    """The cache tracks each row's place in its image across prefill and decode steps."""
    cfg = ModelConfig(vocab_size=70, d_model=32, n_layers=2, n_heads=4, max_seq_len=40, image_tokens=4,
                      image_vocab=10, image_axial=axial)
    torch.manual_seed(0)
    m = Transformer(cfg).eval()
    for p in m.parameters():
        p.normal_(std=0.1)
    seqs = [torch.tensor([1, 5, 6, 2, 60, 65, 66, 67, 61, 62, 1, 7]), torch.tensor([1, 9, 2, 63, 64, 65, 66, 2, 8, 61])]
    n_prompt = [3, 4]
    ids, valid = left_pad([s[:n] for s, n in zip(seqs, n_prompt)])
    cache = KVCache.allocate(cfg, 2, 20, static=static)
    steps = [prefill(m, ids, valid, cache)[:, -1]]
    for j in range(6):
        steps.append(decode_one_token(m, torch.stack([s[n + j] for s, n in zip(seqs, n_prompt)])[:, None], cache))
    for i, (s, n) in enumerate(zip(seqs, n_prompt)):
        full = m(s[None])[0]
        torch.testing.assert_close(torch.stack([st[i] for st in steps]), full[n - 1 : n + 6], atol=1e-5, rtol=0)
    # the embedding is used: without it the logits differ
    before = m(seqs[0][None])
    m.image_pos_emb.weight.zero_()
    assert not torch.allclose(m(seqs[0][None]), before)
    if axial:  # row and column tables are used too
        for table in (m.image_row_emb, m.image_col_emb):
            before = m(seqs[0][None])
            table.weight.zero_()
            assert not torch.allclose(m(seqs[0][None]), before)


@torch.no_grad()
def test_forward_takes_explicit_image_places():
    """Training passes the un-transformed places of CM3 rows; the default is computed from ids."""
    cfg = ModelConfig(vocab_size=70, d_model=32, n_layers=1, n_heads=4, max_seq_len=40, image_tokens=4,
                      image_vocab=10)
    torch.manual_seed(0)
    m = Transformer(cfg).eval()
    for p in m.parameters():
        p.normal_(std=0.1)
    ids = torch.tensor([[1, 5, 2, 60, 4, 63, 3, 61, 62]])  # <mask:0> cut places 1-2 out of the image
    default = image_index(ids, m.first_image_id, 4)
    assert default.tolist() == [[-1, -1, -1, 0, -1, 0, -1, 0, 1]]
    torch.testing.assert_close(m(ids, image_idx=default), m(ids))
    true = torch.tensor([[-1, -1, -1, 0, -1, 3, -1, 1, 2]])
    assert not torch.allclose(m(ids, image_idx=true), m(ids))
    with pytest.raises(ValueError, match="image_idx shape"):
        m(ids, image_idx=true[:, :-1])
    plain = Transformer(ModelConfig(vocab_size=70, d_model=32, n_layers=1, n_heads=4, max_seq_len=40)).eval()
    torch.testing.assert_close(plain(ids, image_idx=true), plain(ids))  # ignored without the embedding


def test_image_position_embedding_config_and_export_errors():
    with pytest.raises(ValueError, match="both"):
        ModelConfig(vocab_size=70, image_tokens=4)
    with pytest.raises(ValueError, match="square"):
        ModelConfig(vocab_size=70, image_tokens=6, image_vocab=10, image_axial=True)
    with pytest.raises(ValueError, match="square"):
        ModelConfig(vocab_size=70, image_axial=True)
    from cm3leon.model.hf import to_opt_config

    with pytest.raises(ValueError, match="OPT"):
        to_opt_config(ModelConfig(vocab_size=70, d_model=32, n_layers=1, n_heads=4, image_tokens=4, image_vocab=10))

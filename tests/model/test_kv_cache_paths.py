"""The two KV-cache attention paths agree: eager (used slots only) == static (whole buffer).

Softmax over a longer key row (the static path's masked extra slots add exact zeros) can
round differently in the last bit, so logits are compared to 1e-6 (fp32) and the greedy
tokens must be identical; the bookkeeping state must be identical.
"""

from __future__ import annotations

import pytest
import torch

from cm3leon.config import ModelConfig
from cm3leon.model.kv_cache import KVCache, decode_one_token, prefill
from cm3leon.model.transformer import Transformer

V = 97


def _model(seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    m = Transformer(ModelConfig(vocab_size=V, d_model=32, n_layers=2, n_heads=4, max_seq_len=64)).eval()
    with torch.no_grad():
        m.lm_head.weight.normal_(std=0.05)  # the paper's zero init would make every logit 0
        m.pos_emb.weight.normal_(std=0.05)
    return m


def _left_pad(lengths: list[int], gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    T = max(lengths)
    ids = torch.zeros(len(lengths), T, dtype=torch.long)
    valid = torch.zeros(len(lengths), T, dtype=torch.bool)
    for i, n in enumerate(lengths):
        ids[i, T - n :] = torch.randint(1, V, (n,), generator=gen)
        valid[i, T - n :] = True
    return ids, valid


def _run(model: Transformer, ids, valid, cont, *, static: bool, dtype: torch.dtype, spare: int):
    cache = KVCache.allocate(model.cfg, ids.shape[0], ids.shape[1] + cont.shape[1] + spare, static=static, dtype=dtype)
    steps = [prefill(model, ids, valid, cache)]
    steps += [decode_one_token(model, cont[:, j : j + 1], cache)[:, None] for j in range(cont.shape[1])]
    return torch.cat(steps, dim=1), cache


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("spare", [0, 9])  # a cache exactly full, and one with unused slots
@torch.inference_mode()
def test_sliced_and_static_paths_give_identical_logits_and_state(dtype: torch.dtype, spare: int) -> None:
    model = _model()
    gen = torch.Generator().manual_seed(3)
    ids, valid = _left_pad([7, 2, 5], gen)
    cont = torch.randint(1, V, (3, 6), generator=gen)
    eager, ce = _run(model, ids, valid, cont, static=False, dtype=dtype, spare=spare)
    static, cs = _run(model, ids, valid, cont, static=True, dtype=dtype, spare=spare)
    assert eager.shape == static.shape == (3, ids.shape[1] + 6, V)
    rows = valid.nonzero(as_tuple=True)  # pad positions' logits are meaningless in both paths
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(eager[rows], static[rows], atol=tol, rtol=0)
    torch.testing.assert_close(eager[:, ids.shape[1] :], static[:, ids.shape[1] :], atol=tol, rtol=0)
    if dtype == torch.float32:
        assert torch.equal(eager[:, ids.shape[1] - 1 :].argmax(-1), static[:, ids.shape[1] - 1 :].argmax(-1))
    used = ids.shape[1] + cont.shape[1]
    for name in ("valid", "pos", "slot"):
        assert torch.equal(getattr(ce, name), getattr(cs, name)), name
    assert ce._written == cs._written == used
    torch.testing.assert_close(ce.k[..., :used, :], cs.k[..., :used, :], atol=tol, rtol=0)
    torch.testing.assert_close(ce.v[..., :used, :], cs.v[..., :used, :], atol=tol, rtol=0)


@torch.inference_mode()
def test_sliced_path_equals_full_forward_of_each_row() -> None:
    """Independent reference: each row alone, no padding, one full causal forward."""
    model = _model(1)
    gen = torch.Generator().manual_seed(4)
    lengths = [3, 8, 5]
    ids, valid = _left_pad(lengths, gen)
    cont = torch.randint(1, V, (3, 4), generator=gen)
    eager, _ = _run(model, ids, valid, cont, static=False, dtype=torch.float32, spare=2)
    for i, n in enumerate(lengths):
        row = torch.cat([ids[i, ids.shape[1] - n :], cont[i]])
        want = model(row[None])[0, n - 1 :]
        torch.testing.assert_close(eager[i, ids.shape[1] - 1 :], want, atol=1e-5, rtol=0)


@torch.inference_mode()
def test_prefill_last_only_is_the_last_column() -> None:
    model = _model(2)
    ids, valid = _left_pad([4, 6], torch.Generator().manual_seed(5))
    full = prefill(model, ids, valid, KVCache.allocate(model.cfg, 2, 8))
    last = prefill(model, ids, valid, KVCache.allocate(model.cfg, 2, 8), last_only=True)
    assert last.shape == (2, 1, V)
    torch.testing.assert_close(last, full[:, -1:], atol=1e-6, rtol=0)


@torch.inference_mode()
def test_eager_steps_then_static_steps_on_one_cache() -> None:
    """A static cache can switch between eager and compiled-style steps: state stays in sync."""
    model = _model(3)
    gen = torch.Generator().manual_seed(6)
    ids, valid = _left_pad([5, 3], gen)
    cont = torch.randint(1, V, (2, 4), generator=gen)
    ref, _ = _run(model, ids, valid, cont, static=False, dtype=torch.float32, spare=0)
    cache = KVCache.allocate(model.cfg, 2, ids.shape[1] + 4)
    prefill(model, ids, valid, cache)
    got = [decode_one_token(model, cont[:, :1], cache), decode_one_token(model, cont[:, 1:2], cache)]
    cache.static = True  # later steps attend over the whole buffer
    got += [decode_one_token(model, cont[:, j : j + 1], cache) for j in (2, 3)]
    torch.testing.assert_close(torch.stack(got, 1), ref[:, ids.shape[1] :], atol=1e-6, rtol=0)

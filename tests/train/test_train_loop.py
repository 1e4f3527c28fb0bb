"""The training loop: loss definition, accumulation, exact resume, non-finite stop, Ctrl-C, eval."""

from __future__ import annotations

import json
import math
import os
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cm3leon.model.io import load_model
from cm3leon.model.transformer import Transformer
from cm3leon.train.checkpoint import list_checkpoints
from cm3leon.train.config import TrainConfig
from cm3leon.train.loop import (
    DataOrder,
    MicroBatches,
    NonFiniteLossError,
    build_optimizer,
    collate,
    evaluate,
    seed_everything,
    train,
    unigram_entropy,
)
from cm3leon.train.parallelize import DistContext
from helpers import VOCAB, SynthData, one_thread, tiny_model_config

CPU = DistContext(0, 1, 0, torch.device("cpu"), "none")


@pytest.fixture(autouse=True)
def _single_thread():
    with one_thread():
        yield


def cfg(**kw) -> TrainConfig:
    base = dict(steps=8, batch_size=4, micro_batch_size=2, lr=3e-3, warmup_steps=2, log_every=1,
                eval_every=0, eval_batches=1, ckpt_every=3, keep_last=10, unigram_samples=8,
                precision="fp32")  # the fp32 references below; a CPU with bf16 matmul would train in bf16
    base.update(kw)
    return TrainConfig(**base)


def train_losses(out: Path) -> dict[int, float]:
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in recs if r["split"] == "train"}


def test_first_loss_is_log_vocab_and_matches_a_hand_written_reference(tmp_path):
    """Independent reference: one full-batch forward + AdamW step per optimizer step, no accumulation."""
    mc, tc, data = tiny_model_config(), cfg(steps=3, grad_clip=0.5), SynthData()
    res = train(mc, tc, data, tmp_path / "run", vocab=VOCAB, progress=False)
    seed_everything(tc.seed)
    model = Transformer(mc)
    opt = build_optimizer(model, tc, torch.device("cpu"))
    order = DataOrder(len(data), tc.seed)
    ref = []
    for step in range(3):
        for g in opt.param_groups:
            g["lr"] = tc.lr_at(step)
        b = collate([data[i] for i in order.take(step * 4, 4)])
        logits = model(b["ids"])
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB.size), b["labels"][:, 1:].reshape(-1),
                               ignore_index=-100)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
        opt.step()
        opt.zero_grad()
        ref.append(loss.item())
    got = [res.losses[s] for s in (1, 2, 3)]
    assert got[0] == pytest.approx(math.log(VOCAB.size), rel=1e-6)  # zero-initialized LM head
    np.testing.assert_allclose(got, ref, rtol=1e-5)


def test_weight_decay_only_on_matrices():
    tc = cfg(weight_decay=0.1)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4))
    opt = build_optimizer(model, tc, torch.device("cpu"))
    by_wd = {g["weight_decay"]: {p.ndim for p in g["params"]} for g in opt.param_groups}
    assert by_wd == {0.1: {2}, 0.0: {1}}
    assert opt.param_groups[0]["betas"] == (0.9, 0.95)


def test_data_order_is_a_permutation_per_epoch_and_ranks_partition_it():
    order = DataOrder(10, seed=3)
    epoch0, epoch1 = order.take(0, 10), order.take(10, 10)
    assert sorted(epoch0) == sorted(epoch1) == list(range(10)) and epoch0 != epoch1
    assert order.take(7, 6) == epoch0[7:] + epoch1[:3]
    plan = TrainConfig(batch_size=4, micro_batch_size=1).batch_plan(seq_len=8, world_size=2)
    per_rank = []
    for rank in range(2):
        it = iter(MicroBatches(DataOrder(10, 3), 0, plan, rank))
        per_rank.append([next(it) for _ in range(2 * plan.grad_accum)])
    step0 = per_rank[0][:2] + per_rank[1][:2]
    assert [i for mb in step0 for i in mb] == epoch0[:4]


def test_resume_reproduces_the_uninterrupted_run_exactly(tmp_path):
    mc, data, val = tiny_model_config(), SynthData(n=10), SynthData(n=4, seed=9)
    tc = cfg(steps=8, eval_every=4)  # 10 items, batch 4: epochs end mid-batch
    full = train(mc, tc, data, tmp_path / "a", vocab=VOCAB, val_data=val, progress=False)
    part = train(mc, tc, data, tmp_path / "b", vocab=VOCAB, val_data=val, until_step=5, progress=False)
    assert part.status == "paused" and part.step == 5 and part.model_dir is None
    assert [p.name for p in list_checkpoints(tmp_path / "b" / "checkpoints")] == [
        "step-00000003", "step-00000005"]
    rest = train(mc, tc, data, tmp_path / "b", vocab=VOCAB, val_data=val, resume=True, progress=False)
    assert rest.status == "completed" and rest.step == 8
    a, b = train_losses(tmp_path / "a"), train_losses(tmp_path / "b")
    assert sorted(a) == sorted(b) == list(range(1, 9))
    assert a == b  # bit-identical, step by step
    assert full.val == rest.val
    wa, wb = load_model(tmp_path / "a"), load_model(tmp_path / "b")
    for (k, x), (_, y) in zip(wa.state_dict().items(), wb.state_dict().items()):
        assert torch.equal(x, y), k


def test_gradient_accumulation_matches_one_big_micro_batch(tmp_path):
    mc, data = tiny_model_config(), SynthData()
    a = train(mc, cfg(steps=4, micro_batch_size=1), data, tmp_path / "a", vocab=VOCAB, progress=False)
    b = train(mc, cfg(steps=4, micro_batch_size=4), data, tmp_path / "b", vocab=VOCAB, progress=False)
    np.testing.assert_allclose(list(a.losses.values()), list(b.losses.values()), rtol=1e-5)


def test_data_loader_workers_do_not_change_training(tmp_path):
    mc, data = tiny_model_config(), SynthData()
    a = train(mc, cfg(steps=3), data, tmp_path / "a", vocab=VOCAB, progress=False)
    b = train(mc, cfg(steps=3, num_workers=2), data, tmp_path / "b", vocab=VOCAB, progress=False)
    assert a.losses == b.losses


def test_activation_checkpointing_does_not_change_training(tmp_path):
    mc, data = tiny_model_config(), SynthData()
    a = train(mc, cfg(steps=3), data, tmp_path / "a", vocab=VOCAB, progress=False)
    b = train(mc, cfg(steps=3, activation_checkpointing=True), data, tmp_path / "b", vocab=VOCAB, progress=False)
    np.testing.assert_allclose(list(a.losses.values()), list(b.losses.values()), rtol=1e-6)


def test_non_finite_loss_stops_naming_the_step_and_keeps_good_checkpoints(tmp_path):
    mc, data, out = tiny_model_config(), SynthData(), tmp_path / "run"
    train(mc, cfg(steps=8, ckpt_every=2), data, out, vocab=VOCAB, until_step=4, progress=False)
    before = {p.name: {f.name: f.read_bytes() for f in p.iterdir()} for p in list_checkpoints(out / "checkpoints")}
    with pytest.raises(NonFiniteLossError, match=r"non-finite .* at step (\d+)") as ei:
        train(mc, cfg(steps=8, ckpt_every=1, lr=1e30, warmup_steps=0), data, out, vocab=VOCAB, resume=True,
              progress=False)
    bad = int(ei.value.args[0].split("at step ")[1].split(";")[0])
    assert bad > 4
    after = list_checkpoints(out / "checkpoints")
    assert all(int(p.name.split("-")[1]) < bad for p in after)
    for p in after:
        if p.name in before:
            assert {f.name: f.read_bytes() for f in p.iterdir()} == before[p.name]
    assert not (out / "model.safetensors").exists()


def test_unigram_entropy_matches_numpy():
    data = SynthData(n=12)
    got = unigram_entropy(data, VOCAB, n_samples=100)
    targets = np.concatenate([data[i]["labels"][1:].numpy() for i in range(12)])
    img = targets[targets >= VOCAB.image_offset]
    _, c = np.unique(img, return_counts=True)
    p = c / c.sum()
    assert got["image_unigram_entropy"] == pytest.approx(float(-(p * np.log(p)).sum()), rel=1e-9)


def test_evaluate_splits_loss_by_target_kind():
    torch.manual_seed(0)
    mc = tiny_model_config()
    model = Transformer(mc)
    torch.nn.init.normal_(model.lm_head.weight, std=0.5)
    data = SynthData(n=5)
    res = evaluate(model, data, VOCAB, batch_size=2, n_batches=3, ctx=CPU)
    b = collate([data[i] for i in range(5)])
    with torch.no_grad():
        logp = model(b["ids"]).log_softmax(-1)[:, :-1]
    tgt = b["labels"][:, 1:]
    ok = tgt != -100
    nll = -logp.gather(-1, tgt.clamp(min=0)[..., None])[..., 0]
    img = ok & (tgt >= VOCAB.image_offset)
    txt = ok & (tgt >= VOCAB.text_offset) & (tgt < VOCAB.image_offset)
    assert res["loss"] == pytest.approx(nll[ok].mean().item(), rel=1e-5)
    assert res["loss_image"] == pytest.approx(nll[img].mean().item(), rel=1e-5)
    assert res["loss_text"] == pytest.approx(nll[txt].mean().item(), rel=1e-5)
    assert res["ppl_image"] == pytest.approx(math.exp(res["loss_image"]), rel=1e-9)
    assert res["tokens"] == ok.sum().item()


def test_refuses_to_overwrite_a_run_and_resume_needs_a_checkpoint(tmp_path):
    mc, data = tiny_model_config(), SynthData()
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        train(mc, cfg(steps=2), data, tmp_path / "new", vocab=VOCAB, resume=True, progress=False)
    train(mc, cfg(steps=2), data, tmp_path / "run", vocab=VOCAB, progress=False)
    with pytest.raises(ValueError, match="--resume"):
        train(mc, cfg(steps=2), data, tmp_path / "run", vocab=VOCAB, progress=False)


def test_bad_inputs_are_named(tmp_path):
    with pytest.raises(ValueError, match="vocab_size"):
        train(tiny_model_config(vocab_size=99), cfg(), SynthData(), tmp_path / "x", vocab=VOCAB, progress=False)
    with pytest.raises(ValueError, match="tokens per image"):
        train(tiny_model_config(image_tokens=VOCAB.image_seq_len + 1, image_vocab=VOCAB.image_size), cfg(),
              SynthData(), tmp_path / "x", vocab=VOCAB, progress=False)
    with pytest.raises(ValueError, match="max_seq_len"):
        train(tiny_model_config(max_seq_len=16), cfg(), SynthData(), tmp_path / "y", vocab=VOCAB, progress=False)
    with pytest.raises(ValueError, match="empty"):
        train(tiny_model_config(), cfg(), SynthData(n=0), tmp_path / "z", vocab=VOCAB, progress=False)


class _CtrlCData(SynthData):
    """Sends this process a SIGINT (as Ctrl-C would) when item number ``at`` is read."""

    def __init__(self, at: int) -> None:
        super().__init__()
        self.reads, self.at = 0, at

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        self.reads += 1
        if self.reads == self.at:
            os.kill(os.getpid(), signal.SIGINT)
        return super().__getitem__(i)


def test_ctrl_c_saves_a_checkpoint_and_resume_continues_exactly(tmp_path):
    tc = cfg(steps=10, ckpt_every=0)
    mc = tiny_model_config()
    ref = train(mc, tc, SynthData(), tmp_path / "ref", vocab=VOCAB, progress=False)
    out = tmp_path / "run"
    before = signal.getsignal(signal.SIGINT)  # SIG_IGN when the suite runs as a background job
    first = train(mc, tc, _CtrlCData(at=30), out, vocab=VOCAB, progress=False)
    assert first.status == "interrupted" and 0 < first.step < 10
    assert signal.getsignal(signal.SIGINT) is before  # handler restored
    assert list_checkpoints(out / "checkpoints")[-1].name == f"step-{first.step:08d}"
    assert first.model_dir is None and not (out / "model.safetensors").exists()
    done = train(mc, tc, SynthData(), out, vocab=VOCAB, resume=True, progress=False)
    assert (done.status, done.step) == ("completed", 10)
    assert train_losses(out) == ref.losses


class _PlacedData(SynthData):
    """SynthData rows with an explicit ``image_idx``: the ids' own places, or shifted by one."""

    def __init__(self, shift: int, **kw) -> None:
        super().__init__(**kw)
        self.shift = shift

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        row = super().__getitem__(i)
        from cm3leon.model.transformer import image_index

        idx = image_index(row["ids"][None], VOCAB.image_offset, VOCAB.image_seq_len)[0]
        row["image_idx"] = torch.where(idx >= 0, (idx + self.shift) % VOCAB.image_seq_len, idx)
        return row


def test_rows_image_places_reach_the_model_in_training_and_evaluation(tmp_path):
    """Rows' ``image_idx`` (the un-transformed places of CM3 rows) is what the model embeds."""
    mc = tiny_model_config(image_tokens=VOCAB.image_seq_len, image_vocab=VOCAB.image_size)
    torch.manual_seed(0)
    model = Transformer(mc)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.2)
    plain, same, shifted = SynthData(n=4), _PlacedData(0, n=4), _PlacedData(1, n=4)
    ev = {k: evaluate(model, d, VOCAB, batch_size=2, n_batches=2, ctx=CPU)["loss_image"]
          for k, d in (("plain", plain), ("same", same), ("shifted", shifted))}
    assert ev["same"] == pytest.approx(ev["plain"], rel=1e-6)
    assert ev["shifted"] != pytest.approx(ev["plain"], rel=1e-3)
    b = collate([shifted[i] for i in range(4)])
    assert torch.equal(b["image_idx"], torch.stack([shifted[i]["image_idx"] for i in range(4)]))
    runs = {}
    for k, d in (("plain", plain), ("same", same), ("shifted", shifted)):
        train(mc, cfg(steps=2), d, tmp_path / k, vocab=VOCAB, progress=False)
        runs[k] = train_losses(tmp_path / k)
    assert runs["same"] == runs["plain"]
    assert runs["shifted"] != runs["plain"]

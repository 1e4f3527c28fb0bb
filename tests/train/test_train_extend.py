"""Extending a run (``--resume`` with more steps): the learning-rate schedule continues."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import pytest

from cm3leon.train.config import LRSchedule, LRTail, TrainConfig
from cm3leon.train.loop import train
from helpers import VOCAB, SynthData, one_thread, tiny_model_config


@pytest.fixture(autouse=True)
def _single_thread():
    with one_thread():
        yield


def cfg(**kw) -> TrainConfig:
    base = dict(steps=8, batch_size=4, micro_batch_size=2, lr=3e-3, warmup_steps=2, log_every=1, eval_every=0,
                eval_batches=1, ckpt_every=4, keep_last=10, unigram_samples=8, decay="cosine")
    base.update(kw)
    return TrainConfig(**base)


def logged_lr(out: Path) -> dict[int, float]:
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["lr"] for r in recs if r["split"] == "train"}


@pytest.mark.parametrize("decay", ["cosine", "linear"])
def test_extension_is_continuous_and_reaches_the_final_rate(decay):
    old = cfg(steps=100, warmup_steps=10, decay=decay)
    new_cfg = cfg(steps=250, warmup_steps=25, decay=decay)  # a recipe re-scales warmup with --steps
    prev = LRSchedule(old)
    ext = prev.extended_to(new_cfg, 60)
    assert ext.end == 250 and ext.tail is not None
    assert ext.lr_at(60) == pytest.approx(prev.lr_at(60), rel=1e-12)  # no jump, no second warmup
    assert ext.lr_at(250) == pytest.approx(new_cfg.lr * new_cfg.min_lr_ratio)
    lrs = [ext.lr_at(s) for s in range(60, 251)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))  # decays monotonically
    assert ext.lr_at(59) == prev.lr_at(59)  # steps already trained keep their schedule
    # not past the planned end: nothing changes
    assert prev.extended_to(cfg(steps=100), 60) is prev


def test_a_finished_run_goes_on_at_its_final_rate():
    old = cfg(steps=100, warmup_steps=10)
    ext = LRSchedule(old).extended_to(cfg(steps=150, warmup_steps=10), 100)
    final = old.lr * old.min_lr_ratio
    assert {round(ext.lr_at(s) / final, 12) for s in range(100, 151)} == {1.0}
    t = LRTail(start=5, start_lr=1e-3, end=10, end_lr=1e-4, decay="constant")
    assert t.lr_at(9) == 1e-3
    assert LRTail.from_dict(t.to_dict()) == t


def test_resume_with_more_steps_continues_the_schedule_and_says_so(tmp_path, caplog):
    mc, data = tiny_model_config(), SynthData(n=10)
    old, new = cfg(steps=8), cfg(steps=12, warmup_steps=3)
    train(mc, old, data, tmp_path / "a", vocab=VOCAB, until_step=4, progress=False)
    with caplog.at_level(logging.INFO, logger="cm3leon.train.loop"):
        res = train(mc, new, data, tmp_path / "a", vocab=VOCAB, resume=True, progress=False)
    assert res.status == "completed" and res.step == 12
    lr = logged_lr(tmp_path / "a")  # the record of step s holds the rate used by step s (index s - 1)
    assert lr[5] == pytest.approx(old.lr_at(4), rel=1e-12)
    assert lr[4] == pytest.approx(old.lr_at(3), rel=1e-12)
    final = new.lr * new.min_lr_ratio
    assert lr[12] == pytest.approx(LRSchedule(old).extended_to(new, 4).lr_at(11), rel=1e-12)
    assert final < lr[12] < lr[11] < lr[5]
    line = next(r.getMessage() for r in caplog.records if "extending the run" in r.getMessage())
    assert "schedule end step 8 -> 12" in line and f"{old.lr_at(4):.3g}" in line and "no new warmup" in line


def test_resumed_extension_reproduces_the_uninterrupted_extension(tmp_path):
    mc, data = tiny_model_config(), SynthData(n=10)
    old, new = cfg(steps=6), cfg(steps=10)
    for name in ("a", "b"):
        train(mc, old, data, tmp_path / name, vocab=VOCAB, progress=False)  # finished at step 6
    train(mc, new, data, tmp_path / "a", vocab=VOCAB, resume=True, progress=False)
    train(mc, new, data, tmp_path / "b", vocab=VOCAB, resume=True, until_step=8, progress=False)
    train(mc, new, data, tmp_path / "b", vocab=VOCAB, resume=True, progress=False)  # same steps: the saved tail
    a, b = logged_lr(tmp_path / "a"), logged_lr(tmp_path / "b")
    assert a == b
    loss = [{r["step"]: r["loss"] for r in map(json.loads, (tmp_path / n / "metrics.jsonl").read_text().splitlines())
             if r["split"] == "train"} for n in ("a", "b")]
    assert loss[0] == loss[1]  # bit-identical, step by step
    final = old.lr * old.min_lr_ratio
    assert all(math.isclose(a[s], final, rel_tol=1e-12) for s in range(7, 11))  # constant tail, no jump

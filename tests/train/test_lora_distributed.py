"""LoRA under ``torchrun --nproc_per_node 2`` (gloo, CPU): DDP and FSDP2 give one process's loss curve
and the same adapter (rtol 1e-5: only float summation order differs).

This file is also the worker script: ``torchrun ... tests/train/test_lora_distributed.py OUT BASE STRATEGY``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: the helpers module
from cm3leon.config import save_json  # noqa: E402
from cm3leon.model.io import save_model  # noqa: E402
from cm3leon.model.transformer import Transformer  # noqa: E402
from cm3leon.safetensors_io import read_safetensors  # noqa: E402
from cm3leon.train.config import TrainConfig  # noqa: E402
from cm3leon.train.loop import train  # noqa: E402
from cm3leon.train.lora import LoraSpec  # noqa: E402
from helpers import VOCAB, SynthData, free_port, one_thread, tiny_model_config  # noqa: E402

SPEC = LoraSpec(r=4, alpha=8, targets=("attn", "mlp"))


def run_config(strategy: str, micro: int, precision: str = "fp32") -> TrainConfig:
    return TrainConfig(steps=4, batch_size=8, micro_batch_size=micro, lr=1e-2, warmup_steps=1, log_every=1,
                       eval_batches=2, eval_batch_size=2, ckpt_every=2, unigram_samples=8, dist=strategy,
                       precision=precision)


def _torchrun(out: Path, base: Path, strategy: str, precision: str = "fp32") -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), __file__, str(out), str(base), strategy, precision]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)


def _losses(out: Path, split: str = "train") -> list[float]:
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in recs if r["split"] == split]


def _base_dir(tmp_path: Path) -> Path:
    base = tmp_path / "base"
    torch.manual_seed(0)
    model = Transformer(tiny_model_config())
    with torch.no_grad():  # a zero-initialised LM head (paper) passes no gradient to the adapters below it
        model.lm_head.weight.normal_(0.0, 0.02)
    save_model(model, base)
    save_json(VOCAB.to_dict(), base / "vocab.json")
    return base


def _compare(tmp_path: Path, strategy: str) -> None:
    base = _base_dir(tmp_path)
    res = _torchrun(tmp_path / strategy, base, strategy)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    with one_thread():
        train(tiny_model_config(), run_config("none", 4), SynthData(), tmp_path / "single", vocab=VOCAB,
              val_data=SynthData(n=6, seed=5), init_from=base, progress=False, lora=SPEC)
    np.testing.assert_allclose(_losses(tmp_path / strategy), _losses(tmp_path / "single"), rtol=1e-5)
    np.testing.assert_allclose(_losses(tmp_path / strategy, "val"), _losses(tmp_path / "single", "val"), rtol=1e-5)
    assert _losses(tmp_path / "single")[-1] < _losses(tmp_path / "single")[0]
    got = read_safetensors(tmp_path / strategy / "adapter" / "adapter_model.safetensors")
    want = read_safetensors(tmp_path / "single" / "adapter" / "adapter_model.safetensors")
    assert got.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_lora_ddp_two_processes_match_one_process(tmp_path):
    _compare(tmp_path, "ddp")


@pytest.mark.slow
def test_lora_fsdp2_two_processes_match_one_process(tmp_path):
    _compare(tmp_path, "fsdp2")


@pytest.mark.slow
def test_lora_fsdp2_with_a_bf16_base_trains_float32_adapters(tmp_path):
    res = _torchrun(tmp_path / "bf16", _base_dir(tmp_path), "fsdp2", "bf16")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    losses = _losses(tmp_path / "bf16")
    assert losses[-1] < losses[0]
    adapter = read_safetensors(tmp_path / "bf16" / "adapter" / "adapter_model.safetensors")
    assert adapter and all(t.dtype == torch.float32 for t in adapter.values())


if __name__ == "__main__":
    out, base, strategy, precision = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], sys.argv[4]
    torch.set_num_threads(1)
    train(tiny_model_config(), run_config(strategy, 2, precision), SynthData(), out, vocab=VOCAB,
          val_data=SynthData(n=6, seed=5), init_from=base, progress=False, lora=SPEC)

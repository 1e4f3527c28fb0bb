"""A full disk while writing checkpoints and weights: one-line error naming the directory, the
space needed and free; no temporary files or directories left; the previous checkpoint intact,
loadable and resumable. Simulated (the safetensors write raises ENOSPC partway) and, where this
machine lets root mount one, on a real 5 MB tmpfs."""

from __future__ import annotations

import errno
import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError
from safetensors.torch import save_file as real_save_file

from cm3leon import safetensors_io as sio
from cm3leon.model.io import load_model, save_model
from cm3leon.model.transformer import Transformer
from cm3leon.safetensors_io import WriteError, write_safetensors
from cm3leon.train import checkpoint as ck
from cm3leon.train.config import TrainConfig
from cm3leon.train.loop import train
from helpers import VOCAB, SynthData, one_thread, tiny_model_config

OSD = {"state": {}, "param_groups": []}


@pytest.fixture(autouse=True)
def _single_thread() -> Iterator[None]:
    with one_thread():
        yield


def _fail_on_call(n: int, exc: BaseException):
    """A save_file that writes the first ``n - 1`` files and, on call ``n``, half a file and then raises."""
    calls = {"n": 0}

    def save_file(tensors, filename, metadata=None):  # noqa: ANN001, ANN202
        calls["n"] += 1
        if calls["n"] == n:
            Path(filename).write_bytes(b"\0" * 1000)  # the part that fitted
            raise exc
        return real_save_file(tensors, filename, metadata=metadata)

    return save_file


def _leftovers(root: Path) -> list[str]:
    return sorted(p.name for p in root.rglob("*") if ".tmp" in p.name or p.name.startswith(".old-"))


def _assert_one_line_disk_full(e: BaseException, directory: Path) -> None:
    msg = str(e)
    assert "\n" not in msg and "Traceback" not in msg
    assert f"to {directory}:" in msg and "No space left on device" in msg, msg
    assert "needs about" in msg and " free)" in msg, msg
    assert getattr(e, "errno", None) == errno.ENOSPC


@pytest.mark.parametrize("exc", [
    OSError(errno.ENOSPC, "No space left on device"),
    SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)"),
], ids=["oserror", "safetensors-error"])
def test_enospc_mid_checkpoint_keeps_the_previous_one_and_leaves_no_temp_dir(tmp_path, monkeypatch, exc):
    ck.save_checkpoint(tmp_path, 1, model_state={"w": torch.ones(1000)}, optimizer_state=OSD, state={"a": 1})
    monkeypatch.setattr(ck, "save_file", _fail_on_call(2, exc))  # model written, optimizer half written
    with pytest.raises(WriteError) as info:
        ck.save_checkpoint(tmp_path, 2, model_state={"w": torch.zeros(1000)}, optimizer_state=OSD, state={})
    _assert_one_line_disk_full(info.value, tmp_path)
    assert "checkpoint step-00000002" in str(info.value) and "needs about 8.8 KiB" in str(info.value)  # w + rng
    assert _leftovers(tmp_path) == []
    assert [p.name for p in ck.list_checkpoints(tmp_path)] == ["step-00000001"]
    back = ck.load_checkpoint(tmp_path / "step-00000001")
    assert torch.equal(back.model["w"], torch.ones(1000)) and back.state["a"] == 1


def test_enospc_while_re_saving_the_same_step_keeps_it(tmp_path, monkeypatch):
    ck.save_checkpoint(tmp_path, 3, model_state={"w": torch.ones(4)}, optimizer_state=OSD, state={})
    monkeypatch.setattr(ck, "save_file", _fail_on_call(1, OSError(errno.ENOSPC, "No space left on device")))
    with pytest.raises(WriteError):
        ck.save_checkpoint(tmp_path, 3, model_state={"w": torch.zeros(4)}, optimizer_state=OSD, state={})
    assert _leftovers(tmp_path) == []
    assert torch.equal(ck.load_checkpoint(tmp_path / "step-00000003").model["w"], torch.ones(4))


def test_leftovers_of_a_save_that_died_are_cleared_and_an_orphaned_old_copy_restored(tmp_path):
    ck.save_checkpoint(tmp_path, 1, model_state={"w": torch.ones(4)}, optimizer_state=OSD, state={})
    (tmp_path / ".tmp-step-00000002-999").mkdir()  # died while writing step 2
    (tmp_path / "step-00000001").rename(tmp_path / ".old-step-00000001-999")  # died while re-saving step 1
    ck.save_checkpoint(tmp_path, 2, model_state={"w": torch.zeros(4)}, optimizer_state=OSD, state={})
    assert _leftovers(tmp_path) == []
    assert [p.name for p in ck.list_checkpoints(tmp_path)] == ["step-00000001", "step-00000002"]
    assert torch.equal(ck.load_checkpoint(tmp_path / "step-00000001").model["w"], torch.ones(4))


def test_other_safetensors_errors_are_not_reported_as_disk_errors(tmp_path, monkeypatch):
    monkeypatch.setattr(ck, "save_file", _fail_on_call(1, SafetensorError("tensors share memory")))
    with pytest.raises(SafetensorError, match="share memory"):
        ck.save_checkpoint(tmp_path, 1, model_state={"w": torch.ones(4)}, optimizer_state=OSD, state={})
    assert _leftovers(tmp_path) == []


def test_model_write_on_a_full_disk_keeps_the_old_weights(tmp_path, monkeypatch):
    torch.manual_seed(0)
    model = Transformer(tiny_model_config())
    save_model(model, tmp_path / "m")
    monkeypatch.setattr(sio, "save_file", _fail_on_call(1, OSError(errno.ENOSPC, "No space left on device")))
    with pytest.raises(WriteError) as info:
        save_model(Transformer(tiny_model_config()), tmp_path / "m")
    _assert_one_line_disk_full(info.value, tmp_path / "m")
    assert "model.safetensors" in str(info.value)
    assert _leftovers(tmp_path) == []
    torch.testing.assert_close(load_model(tmp_path / "m").state_dict(), model.state_dict())


def test_write_safetensors_reports_other_os_errors_in_one_line(tmp_path, monkeypatch):
    monkeypatch.setattr(sio, "save_file", _fail_on_call(1, PermissionError(errno.EACCES, "Permission denied")))
    with pytest.raises(WriteError, match=r"could not write the weights to .*: Permission denied \(needs about 16 b"):
        write_safetensors({"w": torch.ones(4)}, tmp_path / "w.safetensors", what="the weights")
    assert list(tmp_path.iterdir()) == []


def test_image_tokenizer_checkpoint_on_a_full_disk_keeps_the_previous_one(tmp_path, monkeypatch):
    import safetensors.torch

    from cm3leon.tokenize import image_vq_train as vqt
    from cm3leon.tokenize.image_vq import ImageTokenizer, VQConfig

    model = ImageTokenizer(VQConfig(resolution=16, ch=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(),
                                    z_channels=8, embed_dim=8, codebook_size=16, num_groups=4))
    names = [n for n, _ in model.named_parameters()]
    opt = torch.optim.Adam(model.parameters())
    d = tmp_path / "ckpt"
    vqt.save_checkpoint(d, model, opt, names, 1, {})
    monkeypatch.setattr(safetensors.torch, "save_file",
                        _fail_on_call(1, OSError(errno.ENOSPC, "No space left on device")))
    with pytest.raises(WriteError) as info:
        vqt.save_checkpoint(d, model, opt, names, 2, {})
    _assert_one_line_disk_full(info.value, tmp_path)
    assert "the image tokenizer checkpoint ckpt" in str(info.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    assert json.loads((d / "state.json").read_text())["step"] == 1


def test_encoder_save_on_a_full_disk_leaves_no_temp_file(tmp_path, monkeypatch):
    from cm3leon.retrieval.encoder import DualEncoder, DualEncoderConfig, DualEncoderModel
    from cm3leon.tokenize.text_bpe import TextTokenizer

    tok = TextTokenizer.train(["a red circle", "a blue square"] * 4, 280)
    cfg = DualEncoderConfig(vocab_size=tok.vocab_size, dim=16, width=16, text_layers=1, text_heads=2,
                            max_text_len=16, image_size=16, channels=(8, 16))
    monkeypatch.setattr(sio, "save_file", _fail_on_call(1, OSError(errno.ENOSPC, "No space left on device")))
    with pytest.raises(WriteError) as info:
        DualEncoder(DualEncoderModel(cfg), tok).save(tmp_path / "enc")
    _assert_one_line_disk_full(info.value, tmp_path / "enc")
    assert "the encoder weights" in str(info.value) and _leftovers(tmp_path) == []


def test_image_tokenizer_save_on_a_full_disk_keeps_the_old_weights(tmp_path, monkeypatch):
    from cm3leon.tokenize.image_vq import ImageTokenizer, VQConfig

    vq = ImageTokenizer(VQConfig(resolution=16, ch=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(),
                                 z_channels=8, embed_dim=8, codebook_size=16, num_groups=4))
    d = tmp_path / "vq"
    vq.save_pretrained(d)
    before = (d / "model.safetensors").read_bytes()
    monkeypatch.setattr(sio, "save_file", _fail_on_call(1, OSError(errno.ENOSPC, "No space left on device")))
    with pytest.raises(WriteError) as info:
        vq.save_pretrained(d)
    _assert_one_line_disk_full(info.value, d)
    assert "the image tokenizer (model.safetensors)" in str(info.value)
    assert sorted(p.name for p in d.iterdir()) == ["config.json", "model.safetensors"]  # no temp file
    assert (d / "model.safetensors").read_bytes() == before
    ImageTokenizer.from_pretrained(d)


def _tc(**kw) -> TrainConfig:  # noqa: ANN003
    base = dict(steps=4, batch_size=2, log_every=1, ckpt_every=2, keep_last=2, unigram_samples=4)
    return TrainConfig(**{**base, **kw})


def test_training_stops_cleanly_on_a_full_disk_and_resumes(tmp_path, monkeypatch):
    out = tmp_path / "run"
    # step 2's checkpoint is written; step 4's fails after its model file (call 4 of save_file)
    monkeypatch.setattr(ck, "save_file", _fail_on_call(5, OSError(errno.ENOSPC, "No space left on device")))
    with pytest.raises(WriteError) as info:
        train(tiny_model_config(), _tc(), SynthData(n=8), out, vocab=VOCAB, progress=False)
    msg = str(info.value)
    assert msg.startswith("training stopped at step 4: could not write checkpoint step-00000004 to "), msg
    _assert_one_line_disk_full(info.value, out / "checkpoints")
    assert f"the last good checkpoint {out / 'checkpoints' / 'step-00000002'} is kept" in msg
    assert "--resume" in msg
    assert _leftovers(out) == [] and not (out / "model.safetensors").exists()
    assert [p.name for p in ck.list_checkpoints(out / "checkpoints")] == ["step-00000002"]
    monkeypatch.setattr(ck, "save_file", real_save_file)  # space freed
    res = train(tiny_model_config(), _tc(), SynthData(n=8), out, vocab=VOCAB, resume=True, progress=False)
    assert res.status == "completed" and res.step == 4 and (out / "model.safetensors").exists()


def test_final_model_write_on_a_full_disk_says_the_checkpoint_holds_the_run(tmp_path, monkeypatch):
    out = tmp_path / "run"
    monkeypatch.setattr(sio, "save_file", _fail_on_call(1, OSError(errno.ENOSPC, "No space left on device")))
    with pytest.raises(WriteError) as info:
        train(tiny_model_config(), _tc(), SynthData(n=8), out, vocab=VOCAB, progress=False)
    msg = str(info.value)
    assert msg.startswith("training finished at step 4 but could not write the model weights"), msg
    assert f"checkpoint {out / 'checkpoints' / 'step-00000004'} holds the finished run" in msg
    assert _leftovers(out) == []
    monkeypatch.setattr(sio, "save_file", real_save_file)
    res = train(tiny_model_config(), _tc(), SynthData(n=8), out, vocab=VOCAB, resume=True, progress=False)
    assert res.status == "completed" and load_model(out).cfg == tiny_model_config()


# ---------------------------------------------------------------- a real full disk

@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 5 MB tmpfs (root only; skipped where mounting is not allowed), unmounted afterwards."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    try:
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=5m", "tmpfs", str(mnt)], capture_output=True,
                           text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        pytest.skip(f"cannot mount a tmpfs here ({e})")
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip() or r.returncode}")
    try:
        yield mnt
    finally:
        if subprocess.run(["umount", str(mnt)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def _fill(disk: Path, leave: int) -> Path:
    """A ballast file that leaves ``leave`` bytes free on ``disk``."""
    ballast = disk / "ballast"
    st = os.statvfs(disk)
    size = st.f_bavail * st.f_frsize - leave
    with open(ballast, "wb") as f:
        f.write(b"\0" * max(size, 0))
    return ballast


def test_real_full_disk_stops_training_with_one_line_and_resumes_after_space_is_freed(small_disk):
    out = small_disk / "run"
    tc = _tc(steps=3, ckpt_every=1, keep_last=1)
    first = train(tiny_model_config(), tc, SynthData(n=8), out, vocab=VOCAB, until_step=1, progress=False)
    assert first.status == "paused"
    ckpt1 = out / "checkpoints" / "step-00000001"
    size = sum(f.stat().st_size for f in ckpt1.iterdir())
    ballast = _fill(small_disk, leave=size // 2)  # not room for one more checkpoint
    with pytest.raises(WriteError) as info:
        train(tiny_model_config(), tc, SynthData(n=8), out, vocab=VOCAB, resume=True, progress=False)
    msg = str(info.value)
    assert msg.startswith("training stopped at step 2: could not write checkpoint step-00000002 to "), msg
    _assert_one_line_disk_full(info.value, out / "checkpoints")
    assert f"the last good checkpoint {ckpt1} is kept" in msg
    assert _leftovers(out) == []
    assert [p.name for p in ck.list_checkpoints(out / "checkpoints")] == ["step-00000001"]
    assert ck.load_checkpoint(ckpt1).step == 1
    ballast.unlink()
    res = train(tiny_model_config(), tc, SynthData(n=8), out, vocab=VOCAB, resume=True, progress=False)
    assert res.status == "completed" and res.step == 3 and load_model(out).cfg == tiny_model_config()
    assert _leftovers(out) == []


def test_real_full_disk_checkpoint_write(small_disk):
    ck.save_checkpoint(small_disk, 1, model_state={"w": torch.ones(2**19)}, optimizer_state=OSD, state={})  # 2 MiB
    with pytest.raises(WriteError) as info:
        ck.save_checkpoint(small_disk, 2, model_state={"w": torch.zeros(2**20)}, optimizer_state=OSD, state={})
    _assert_one_line_disk_full(info.value, small_disk)
    assert "needs about 4.0 MiB" in str(info.value)
    assert _leftovers(small_disk) == []
    assert torch.equal(ck.load_checkpoint(small_disk / "step-00000001").model["w"], torch.ones(2**19))

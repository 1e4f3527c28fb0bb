"""Nothing of the user's is lost and no two runs share a directory: writers replace only
directories cm3leon wrote (cm3leon.workspace), outputs inside inputs are refused, and the
quickstart, training, tokenizer training and shard writing hold a lock on their output."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cm3leon.cli import main
from cm3leon.workspace import (
    LOCK_NAME,
    NotOwnedError,
    OutputInsideInputError,
    WorkspaceBusyError,
    WorkspaceLock,
    check_not_inside,
    check_replaceable,
    foreign_files,
    holder,
    replace_owned_dir,
)


def _snapshot(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _error_line(capsys: pytest.CaptureFixture) -> str:
    """The CLI's error: one line, no traceback."""
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if ln.startswith("error: ")]
    assert len(lines) == 1, err
    return lines[0]


def _image_folder(d: Path, n: int = 30, *, captions: bool = False) -> Path:
    """``n`` PNGs and ``sub/notes.md`` (with ``captions``: and a captions.jsonl)."""
    d.mkdir(parents=True)
    rng = np.random.default_rng(0)
    caps = []
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(d / f"{i:02d}.png")
        caps.append(json.dumps({"file": f"{i:02d}.png", "text": f"picture {i}"}))
    if captions:
        (d / "captions.jsonl").write_text("\n".join(caps) + "\n")
    (d / "sub").mkdir()
    (d / "sub" / "notes.md").write_text("my notes\n")
    return d


# ---- case 1: overwrites -------------------------------------------------------------------
def test_convert_onto_its_own_source_folder_is_refused_and_nothing_is_lost(tmp_path, capsys):
    images = _image_folder(tmp_path / "A" / "images")
    before = _snapshot(tmp_path)
    assert main(["data", "convert", str(images), "--out", str(images), "--overwrite"]) == 1
    assert _error_line(capsys) == f"error: --out {images} is inside the input {images}: write elsewhere"
    assert main(["data", "convert", str(images), "--out", str(images / "ds"), "--overwrite"]) == 1
    assert "is inside the input" in _error_line(capsys)
    assert main(["data", "convert", str(images), "--out", str(tmp_path / "A"), "--overwrite"]) == 1
    assert "which would be replaced" in _error_line(capsys)
    assert _snapshot(tmp_path) == before


def test_convert_over_a_folder_of_foreign_files_names_them_and_keeps_them(tmp_path, capsys):
    images = _image_folder(tmp_path / "A" / "images")
    src = _image_folder(tmp_path / "B", n=3, captions=True)
    before = _snapshot(images)
    assert main(["data", "convert", str(src), "--out", str(images), "--overwrite"]) == 1
    assert _error_line(capsys) == (f"error: {images} holds 31 files that cm3leon did not write (e.g. 00.png, 01.png, "
                                   "02.png, ...); choose an empty --out or remove them yourself")
    assert _snapshot(images) == before
    assert sorted(p.name for p in (tmp_path / "A").iterdir()) == ["images"]  # no temporaries left behind
    # a dataset cm3leon wrote is replaced; one with a user's file in it is not
    out = tmp_path / "ds"
    assert main(["data", "convert", str(src), "--out", str(out)]) == 0
    assert main(["data", "convert", str(src), "--out", str(out), "--overwrite"]) == 0
    (out / "sub").mkdir()
    (out / "sub" / "thesis.tex").write_text("\\chapter{}")
    assert main(["data", "convert", str(src), "--out", str(out), "--overwrite"]) == 1
    assert "holds 1 file that cm3leon did not write (e.g. sub/thesis.tex)" in _error_line(capsys)
    assert (out / "sub" / "thesis.tex").read_text() == "\\chapter{}" and (out / "manifest.json").exists()
    capsys.readouterr()


def test_shapes_overwrite_replaces_only_a_dataset(tmp_path, capsys):
    from cm3leon.shapes.dataset import write_shapes_dataset

    out = tmp_path / "d"
    out.mkdir()
    (out / "notes.md").write_text("keep")
    with pytest.raises(NotOwnedError, match="holds 1 file that cm3leon did not write"):
        write_shapes_dataset(out, 2, workers=1, overwrite=True)
    assert main(["data", "shapes", "--out", str(out), "--n", "2", "--workers", "1", "--overwrite"]) == 1
    assert "(e.g. notes.md)" in _error_line(capsys)
    assert _snapshot(out) == {"notes.md": b"keep"}
    ds = write_shapes_dataset(tmp_path / "s", 2, workers=1)
    write_shapes_dataset(ds, 3, workers=1, overwrite=True)  # its own dataset: replaced
    assert json.loads((ds / "manifest.json").read_text())["n"] == 3


@pytest.fixture(scope="module")
def toolkit(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    import torch

    from cm3leon.data.dataset import Dataset
    from cm3leon.shapes.dataset import write_shapes_dataset
    from cm3leon.tokenize.image_vq import ImageTokenizer, VQConfig
    from cm3leon.tokenize.text_bpe import TextTokenizer

    root = tmp_path_factory.mktemp("ws_tok")
    data = write_shapes_dataset(root / "data", 3, size=32, seed=0, workers=1)
    TextTokenizer.train([r.text for r in Dataset(data)] * 3, vocab_size=300, min_frequency=1).save(root / "text")
    torch.manual_seed(0)
    ImageTokenizer(VQConfig.from_name("shapes-32")).save_pretrained(root / "image")
    return {"data": data, "text": root / "text", "image": root / "image"}


def _tokenize(toolkit: dict[str, Path], out: Path, *extra: str) -> int:
    return main(["data", "tokenize", "--data", str(toolkit["data"]), "--text-tokenizer", str(toolkit["text"]),
                 "--image-tokenizer", str(toolkit["image"]), "--out", str(out), *extra])


def test_tokenize_overwrite_keeps_the_users_files(toolkit, tmp_path, capsys):
    d = tmp_path / "DIR"
    d.mkdir()
    (d / "thesis.tex").write_text("years of work")
    assert _tokenize(toolkit, d, "--overwrite") == 1
    assert _error_line(capsys) == (f"error: {d} holds 1 file that cm3leon did not write (e.g. thesis.tex); "
                                   "choose an empty --out or remove them yourself")
    assert _tokenize(toolkit, d) == 1  # without --overwrite: one line, not a FileExistsError traceback
    assert "already exists" in _error_line(capsys)
    assert _snapshot(d) == {"thesis.tex": b"years of work"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["DIR"]  # no temporaries, no lock file left
    # shards cm3leon wrote are replaced with --overwrite; shards plus a user's file are not
    sh = tmp_path / "shards"
    assert _tokenize(toolkit, sh) == 0 and _tokenize(toolkit, sh, "--overwrite") == 0
    assert _tokenize(toolkit, sh, "--sft", "--overwrite") == 0
    (sh / "thesis.tex").write_text("years of work")
    assert _tokenize(toolkit, sh, "--overwrite") == 1
    assert "(e.g. thesis.tex)" in _error_line(capsys)
    assert (sh / "thesis.tex").exists() and (sh / "tokens.bin").exists()
    assert _tokenize(toolkit, toolkit["data"] / "shards") == 1  # --out inside --data
    assert "is inside the input" in _error_line(capsys)
    assert _tokenize(toolkit, toolkit["text"], "--overwrite") == 1  # --out is an input
    assert f"--out {toolkit['text']} is the input" in _error_line(capsys)


def test_quickstart_does_not_replace_a_users_file_in_its_data_folder(tmp_path, capsys):
    p = tmp_path / "P"
    (p / "data" / "train").mkdir(parents=True)
    (p / "data" / "train" / "mine.txt").write_text("mine")
    t0 = time.perf_counter()
    assert main(["quickstart", "--out", str(p), "--preset", "smoke"]) == 1
    assert time.perf_counter() - t0 < 30
    assert _error_line(capsys) == (f"error: {p / 'data'} holds 1 file that cm3leon did not write "
                                   "(e.g. train/mine.txt); choose an empty --out or remove them yourself")
    assert _snapshot(p) == {"data/train/mine.txt": b"mine"}


def test_the_data_stage_writer_refuses_foreign_files(tmp_path):
    from cm3leon.quickstart import _stage_data, get_preset

    d = tmp_path / "data"
    (d / "train").mkdir(parents=True)
    (d / "train" / "mine.txt").write_text("mine")
    with pytest.raises(NotOwnedError, match="train holds 1 file"):
        _stage_data(get_preset("smoke", n_train=2, n_val=2))(d)
    assert _snapshot(d) == {"train/mine.txt": b"mine"}


def _stage(tag: str, files: tuple[str, ...] = ("out.txt",)):
    def fn(d: Path) -> dict[str, str]:
        for f in files:
            (d / f).parent.mkdir(parents=True, exist_ok=True)
            (d / f).write_text(tag)
        return {"tag": tag}
    return fn


def test_a_stage_folder_holding_foreign_files_is_refused_not_deleted(tmp_path):
    from cm3leon.quickstart import Stages, get_preset

    p, p2 = get_preset("smoke"), get_preset("smoke", encoder_steps=99)
    Stages(tmp_path, p).run("s", _stage("a", ("out.txt", "sub/part.bin")), ("encoder_steps",))
    rec = json.loads((tmp_path / "s" / "stage.json").read_text())
    assert rec["files"] == ["out.txt", "sub/part.bin"]
    (tmp_path / "s" / "notes.md").write_text("mine")
    for st in (Stages(tmp_path, p2), Stages(tmp_path, p, force=True)):
        with pytest.raises(NotOwnedError, match=r"s holds 1 file that cm3leon did not write \(e\.g\. notes\.md\)"):
            st.run("s", _stage("b"), ("encoder_steps",))
        assert (tmp_path / "s" / "notes.md").read_text() == "mine" and (tmp_path / "s" / "out.txt").read_text() == "a"
    (tmp_path / "s" / "notes.md").unlink()
    assert Stages(tmp_path, p2).run("s", _stage("b"), ("encoder_steps",)) == {"tag": "b"}
    assert not (tmp_path / "s" / "sub").exists()  # the earlier outputs were the stage's: removed
    # a folder that no stage started, holding someone's files, is not run in
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "x.txt").write_text("mine")
    with pytest.raises(NotOwnedError, match="e.g. x.txt"):
        Stages(tmp_path, p).run("t", _stage("t"))


def test_an_unfinished_stage_is_resumed_and_then_replaced(tmp_path):
    from cm3leon.quickstart import STAGE_STARTED, Stages, get_preset

    p, p2 = get_preset("smoke"), get_preset("smoke", encoder_steps=99)

    def crash(d: Path) -> dict[str, str]:
        (d / "checkpoints").mkdir()
        (d / "checkpoints" / "step1.pt").write_text("ckpt")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        Stages(tmp_path, p).run("s", crash, ("encoder_steps",))
    assert (tmp_path / "s" / STAGE_STARTED).exists() and not (tmp_path / "s" / "stage.json").exists()
    seen = []

    def resume(d: Path) -> dict[str, str]:
        seen.append((d / "checkpoints" / "step1.pt").read_text())
        return {}

    Stages(tmp_path, p).run("s", resume, ("encoder_steps",))  # run in place: the checkpoint is its own
    assert seen == ["ckpt"] and not (tmp_path / "s" / STAGE_STARTED).exists()
    assert json.loads((tmp_path / "s" / "stage.json").read_text())["files"] == ["checkpoints/step1.pt"]
    Stages(tmp_path, p2).run("s", _stage("b"), ("encoder_steps",))
    assert sorted(os.listdir(tmp_path / "s")) == ["out.txt", "stage.json"]


def test_a_stage_recorded_before_file_lists_keeps_files_added_after_it(tmp_path):
    from cm3leon.quickstart import Stages, get_preset

    p, p2 = get_preset("smoke"), get_preset("smoke", encoder_steps=99)
    Stages(tmp_path, p).run("s", _stage("a"), ("encoder_steps",))
    marker = tmp_path / "s" / "stage.json"
    rec = json.loads(marker.read_text())
    del rec["files"]
    marker.write_text(json.dumps(rec))
    t = marker.stat().st_mtime
    os.utime(tmp_path / "s" / "out.txt", (t - 10, t - 10))
    (tmp_path / "s" / "later.md").write_text("mine")
    os.utime(tmp_path / "s" / "later.md", (t + 10, t + 10))
    with pytest.raises(NotOwnedError, match="e.g. later.md"):
        Stages(tmp_path, p2).run("s", _stage("b"), ("encoder_steps",))
    (tmp_path / "s" / "later.md").unlink()
    assert Stages(tmp_path, p2).run("s", _stage("b"), ("encoder_steps",)) == {"tag": "b"}


# ---- the library pieces ---------------------------------------------------------------------
def test_replace_owned_dir_and_check_not_inside(tmp_path):
    d = tmp_path / "d"
    (d / "sub").mkdir(parents=True)
    for name in ("a.bin", "sub/b.bin", "zz.txt", "sub/notes.md"):
        (d / name).write_text(name)
    owner = lambda p: {"a.bin", "sub/b.bin"} if (p / "a.bin").exists() else None  # noqa: E731
    assert foreign_files(d, owner) == ["zz.txt", "sub/notes.md"]  # shallowest first
    with pytest.raises(NotOwnedError, match=r"holds 2 files .* \(e\.g\. zz\.txt, sub/notes\.md\)"):
        replace_owned_dir(d, owner)
    assert len(_snapshot(d)) == 4
    (d / "zz.txt").unlink()
    (d / "sub" / "notes.md").unlink()
    (d / LOCK_NAME).write_text("{}")  # a stale lock file is not a user's file
    replace_owned_dir(d, owner)
    assert not d.exists()
    replace_owned_dir(d, owner)  # absent: nothing to do
    d.mkdir()
    check_replaceable(d, owner)  # empty: fine
    (tmp_path / "f").write_text("x")
    with pytest.raises(NotOwnedError, match="is a file"):
        check_replaceable(tmp_path / "f", owner)
    check_not_inside(tmp_path / "out", tmp_path / "in", None)
    with pytest.raises(OutputInsideInputError, match="is inside the input"):
        check_not_inside(tmp_path / "in" / ".." / "in", tmp_path / "in")
    check_not_inside(tmp_path, tmp_path / "in", replaces=False)  # writing files into a parent replaces nothing
    with pytest.raises(OutputInsideInputError, match="would be replaced"):
        check_not_inside(tmp_path, tmp_path / "in")


# ---- case 2: one run per directory ---------------------------------------------------------
_HOLD = """
import sys
from cm3leon.workspace import WorkspaceLock
lock = WorkspaceLock(sys.argv[1], command=sys.argv[2]).acquire()
print("ready", flush=True)
if sys.argv[3] == "die":
    import os
    os._exit(0)  # dies holding it: the lock file stays behind
sys.stdin.read()
lock.release()
"""
_TRY = """
import sys
from cm3leon.workspace import WorkspaceBusyError, WorkspaceLock
try:
    WorkspaceLock(sys.argv[1]).acquire()
except WorkspaceBusyError as e:
    print(e)
    sys.exit(3)
"""


class _Holder:
    """A second process holding the lock of ``directory`` until :meth:`stop`."""

    def __init__(self, directory: Path, command: str = "cm3leon quickstart --out runs/qs") -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", _HOLD, str(directory), command, "hold"],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None and self.proc.stdout.readline().strip() == "ready"

    def stop(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        assert self.proc.wait(timeout=30) == 0


def test_a_second_process_is_refused_at_once_and_told_who_holds_it(tmp_path):
    ws = tmp_path / "qs"
    first = _Holder(ws)
    try:
        t0 = time.perf_counter()
        second = subprocess.run([sys.executable, "-c", _TRY, str(ws)], capture_output=True, text=True, timeout=60)
        assert second.returncode == 3, second.stderr
        msg = second.stdout.strip()
        assert msg.startswith(f"{ws} is in use by pid {first.proc.pid} (cm3leon quickstart --out runs/qs, since ")
        assert msg.endswith("); wait for it or stop it")
        with pytest.raises(WorkspaceBusyError, match=f"pid {first.proc.pid}"):  # this process too
            WorkspaceLock(ws).acquire()
        assert holder(ws)["alive"] is True
        assert time.perf_counter() - t0 < 30
    finally:
        first.stop()
    assert not (ws / LOCK_NAME).exists()  # released: the file is gone
    with WorkspaceLock(ws) as lock:
        assert lock.held and holder(ws)["pid"] == os.getpid()
        with pytest.raises(WorkspaceBusyError):  # one holder per directory, in one process as well
            WorkspaceLock(ws).acquire()
    assert holder(ws) is None
    nested = tmp_path / "a" / "b"
    with WorkspaceLock(nested):
        assert nested.is_dir()
    assert not (tmp_path / "a").exists()  # the directories the lock made, left empty, go with it


def test_a_lock_left_by_a_dead_process_is_taken_over(tmp_path, caplog):
    ws = tmp_path / "qs"
    dead = subprocess.run([sys.executable, "-c", _HOLD, str(ws), "cm3leon train --out qs", "die"],
                          capture_output=True, text=True, timeout=60)
    assert dead.stdout.strip() == "ready"
    left = holder(ws)
    assert left is not None and left["alive"] is False and left["command"] == "cm3leon train --out qs"
    with caplog.at_level("WARNING", logger="cm3leon.workspace"), WorkspaceLock(ws):
        assert holder(ws)["pid"] == os.getpid()
    assert "no longer running" in caplog.text
    assert not (ws / LOCK_NAME).exists()


def test_run_quickstart_refuses_a_workspace_in_use_and_leaves_the_first_runs_outputs_alone(tmp_path, capsys):
    from cm3leon.quickstart import run_quickstart

    ws = tmp_path / "qs"
    (ws / "pretrain").mkdir(parents=True)
    metrics = "".join(json.dumps({"step": i, "loss": 1.0 / i}) + "\n" for i in range(1, 25))
    (ws / "pretrain" / "metrics.jsonl").write_text(metrics)
    before = _snapshot(ws)
    first = _Holder(ws)
    try:
        t0 = time.perf_counter()
        with pytest.raises(WorkspaceBusyError, match=f"in use by pid {first.proc.pid}"):
            run_quickstart(ws, "smoke", device="cpu")
        assert main(["quickstart", "--out", str(ws), "--preset", "smoke", "--seed", "1"]) == 1
        assert _error_line(capsys).endswith("wait for it or stop it")
        assert time.perf_counter() - t0 < 30
        assert {k: v for k, v in _snapshot(ws).items() if k != LOCK_NAME} == before
        assert len((ws / "pretrain" / "metrics.jsonl").read_text().splitlines()) == 24
    finally:
        first.stop()


def test_train_and_tokenizer_training_refuse_an_output_in_use(toolkit, tmp_path, capsys):
    run = tmp_path / "run"
    first = _Holder(run, command="cm3leon train --recipe smoke --out run")
    try:
        assert main(["train", "--recipe", "smoke", "--out", str(run)]) == 1
        assert f"is in use by pid {first.proc.pid} (cm3leon train --recipe smoke --out run" in _error_line(capsys)
        assert main(["tokenizer", "train-text", "--data", str(toolkit["data"]), "--vocab-size", "300",
                     "--out", str(run)]) == 1
        assert "wait for it or stop it" in _error_line(capsys)
        assert main(["tokenizer", "train-image", "--data", str(toolkit["data"]), "--out", str(run)]) == 1
        assert "wait for it or stop it" in _error_line(capsys)
    finally:
        first.stop()
    assert not run.exists()  # nothing was written; the holder's lock took its directory with it
    # with the holder gone, the text tokenizer trains; --out inside --data is refused
    assert main(["tokenizer", "train-text", "--data", str(toolkit["data"]), "--vocab-size", "300",
                 "--min-frequency", "1", "--out", str(run)]) == 0
    assert (run / "tokenizer.json").exists() and not (run / LOCK_NAME).exists()
    assert main(["tokenizer", "train-text", "--data", str(toolkit["data"]), "--vocab-size", "300",
                 "--out", str(toolkit["data"] / "tok")]) == 1
    assert "is inside the input" in _error_line(capsys)


def test_two_shard_writers_on_one_directory(tmp_path):
    from cm3leon.data.shards import Shards, ShardWriter
    from cm3leon.vocab import Vocab

    v = Vocab(text_size=50, image_size=16, image_seq_len=4)
    out = tmp_path / "s"
    w = ShardWriter(out, v)
    with pytest.raises(WorkspaceBusyError, match="is in use by pid"):
        ShardWriter(out, v)
    w.add([v.eos_id, v.text_offset])
    w.finalize()
    assert len(Shards(out)) == 1 and sorted(os.listdir(tmp_path)) == ["s"]  # lock released and removed
    w2 = ShardWriter(out, v, overwrite=True)
    w2.abort()
    assert sorted(os.listdir(tmp_path)) == ["s"]

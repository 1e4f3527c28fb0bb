"""``cm3leon train`` (pretraining) and ``cm3leon sft`` (instruction tuning): one loop, two configs."""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

_TRAIN_EXAMPLES = """examples:
  cm3leon train --list-recipes
  cm3leon train --recipe smoke --out runs/quickstart/smoke           # data: runs/quickstart/shards/pretrain
  cm3leon train --recipe quickstart --workspace runs/qs --out runs/qs/pretrain2 --override lr=1e-3 steps=500
  cm3leon train --recipe quickstart --out runs/qs/pretrain2 --resume # continue after Ctrl-C / a crash
  cm3leon train --recipe paper-350m --print-config > my.json          # start your own config from a recipe
  torchrun --nproc_per_node 8 -m cm3leon.cli train --config my.json --out runs/350m

Relative data paths in a recipe (e.g. shards/pretrain) are resolved against --workspace
(default: the parent of --out, which matches `cm3leon quickstart --out WS`'s layout).
--out receives metrics.jsonl, loss.png, checkpoints/ and, at the end, the model
(config.json, model.safetensors, vocab.json).
"""

_SFT_EXAMPLES = """examples:
  cm3leon sft --base runs/qs/pretrain --recipe sft-quickstart --out runs/qs/sft2
  cm3leon sft --base runs/qs/pretrain --recipe sft-quickstart --out runs/qs/sft2 --resume
  cm3leon sft --base runs/7b --config sft-7b.json --out runs/7b-sft --override data.train=/data/sft-shards
  cm3leon sft --base runs/qs/model --recipe sft-quickstart --out runs/qs/lora --lora r=16,alpha=32,targets=attn --merge

The model shape comes from --base (its config.json); the recipe/config gives the
optimizer, schedule and SFT data (tokenized with `cm3leon data tokenize --sft`).
With --lora only low-rank adapters train (the base stays frozen): --out receives adapter/
(adapter_model.safetensors + peft's adapter_config.json) and, with --merge, a merged model
directory (default --out/merged) that every command loads. See docs/sft.md#lora.
"""


def _add_common(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group()
    src.add_argument("--recipe", help="a named run config (see --list-recipes)")
    src.add_argument("--config", type=Path, help="a run config JSON file (see --print-config)")
    p.add_argument("--out", type=Path, help="run directory (metrics, checkpoints, final model)")
    p.add_argument("--workspace", type=Path, help="directory the config's relative data paths are under "
                   "(default: the parent of --out)")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    p.add_argument("--steps", type=int, help="total optimizer steps (a recipe scales its warmup, logging and "
                   "checkpoints to them; with --config only train.steps changes)")
    p.add_argument("--until-step", type=int, help="stop (checkpointed, resumable) after this step")
    p.add_argument("--override", nargs="+", default=[], metavar="KEY=VALUE",
                   help="edit the config: lr=1e-4, train.dist=ddp, data.train=DIR, model_overrides.d_model=128")
    p.add_argument("--print-config", action="store_true", help="print the resolved run config as JSON and exit")
    p.add_argument("--list-recipes", action="store_true", help="list the named recipes and exit")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def register(sub: Any) -> None:
    """Add the ``train`` and ``sft`` subcommands."""
    fmt = argparse.RawDescriptionHelpFormatter
    p = sub.add_parser("train", help="pretrain the decoder (CM3 objective, retrieval-augmented)",
                       description="Pretrain CM3Leon on tokenized shards (single CPU/GPU, or torchrun "
                       "DDP/FSDP2).", epilog=_TRAIN_EXAMPLES, formatter_class=fmt)
    _add_common(p)
    p.set_defaults(func=_run_train, mode="train")
    s = sub.add_parser("sft", help="instruction-tune a pretrained model on the task mixture",
                       description="Supervised fine-tuning (paper §4) from a pretrained model directory.",
                       epilog=_SFT_EXAMPLES, formatter_class=fmt)
    _add_common(s)
    s.add_argument("--base", type=Path, help="pretrained model directory (default: the config's init_from)")
    s.add_argument("--lora", metavar="SPEC", help="train LoRA adapters only: r=16,alpha=32,targets=NAMES[,dropout=0.05]"
                   "[,base=bf16]; targets are Linear names (qkv,out,fc1,fc2 / q_proj,k_proj,v_proj,o_proj,gate_proj,"
                   "up_proj,down_proj) or groups all-linear (default), attn, mlp")
    s.add_argument("--merge", nargs="?", type=Path, const=True, default=None, metavar="DIR",
                   help="with --lora: after training write the base with the adapters merged to DIR "
                   "(default: --out/merged)")
    s.set_defaults(func=_run_train, mode="sft")


def load_run_config(args: argparse.Namespace) -> Any:
    """The run config from --recipe/--config with --steps/--override applied (paths not yet resolved)."""
    from cm3leon.train.config import RunConfig
    from cm3leon.train.recipes import get_recipe

    edits = list(args.override)
    if args.recipe:
        run = get_recipe(args.recipe, steps=args.steps)  # the recipe scales its schedule to --steps
    elif args.config:
        run = RunConfig.from_json_file(args.config)
        if args.steps is not None:
            edits.append(f"train.steps={args.steps}")
    else:
        raise ValueError("give --recipe NAME or --config FILE (see --list-recipes)")
    return run.with_overrides(edits) if edits else run


def _run_train(args: argparse.Namespace) -> int:
    import json

    from cm3leon.cli import CLIError
    from cm3leon.train.recipes import RECIPES

    if args.list_recipes:
        width = max(map(len, RECIPES))
        for name, fn in RECIPES.items():
            summary = " ".join(line.strip() for line in (fn.__doc__ or "").strip().split("\n\n")[0].splitlines())
            print(f"{name:{width}s}  {summary}")
        return 0
    run = load_run_config(args)
    if args.print_config:
        print(run.to_json(), end="")
        return 0
    if args.out is None:
        raise ValueError("--out DIR is required (the run directory)")
    workspace = args.workspace or args.out.resolve().parent
    run = run.resolve_paths(workspace)
    base = None
    lora = None
    if args.mode == "sft" and (args.lora or args.merge):
        from cm3leon.train.lora import LoraSpec

        if not args.lora:
            raise ValueError("--merge merges LoRA adapters: give --lora r=...,alpha=...,targets=... too")
        lora = LoraSpec.parse(args.lora)
    if args.mode == "sft":
        base = args.base or (Path(run.init_from) if run.init_from else None)
        if base is None:
            raise ValueError("cm3leon sft needs --base DIR (a pretrained model directory)")
        from cm3leon.model.io import weight_files

        if not all(f.exists() for f in weight_files(base)):
            raise FileNotFoundError(f"--base {base} holds no model.safetensors; point it at a finished `cm3leon "
                                    "train` --out directory or a converted model")
    elif run.init_from:
        base = Path(run.init_from)
    from cm3leon.train.loop import NonFiniteLossError
    from cm3leon.train.run import run_training
    from cm3leon.workspace import WorkspaceLock

    # One run per --out: a second would interleave metrics.jsonl and race on checkpoints. The
    # ranks of one torchrun job share it, so only rank 0 takes the lock.
    lock = WorkspaceLock(args.out) if int(os.environ.get("RANK", "0")) == 0 else None
    if lock is not None:
        lock.acquire()
    try:
        res = run_training(run, args.out, base=base, resume=args.resume, until_step=args.until_step,
                           progress=not args.no_progress, lora=lora)
    except NonFiniteLossError as e:
        raise CLIError(str(e)) from e
    finally:
        if lock is not None:
            lock.release()
    if int(os.environ.get("RANK", "0")) != 0:
        return 0
    if res.status == "interrupted":
        print(f"interrupted at step {res.step}; checkpoint {res.checkpoint}. Continue with the same command "
              "plus --resume")
        return 130
    summary = {"status": res.status, "step": res.step, "tokens": res.tokens, "out": str(res.out_dir)}
    if lora is not None and res.model_dir is not None:
        summary["adapter"] = str(res.model_dir)
        if args.merge:
            from cm3leon.train.lora import merge_adapter

            merged = args.out / "merged" if args.merge is True else args.merge
            summary["merged"] = str(merge_adapter(res.model_dir, merged, base_dir=base))
    if res.losses:
        summary["train_loss"] = res.losses[max(res.losses)]
    if res.val:
        summary["val"] = {k: round(v, 4) for k, v in res.val.items() if k.startswith(("loss", "ppl"))}
    print(json.dumps(summary, indent=1))
    return 0

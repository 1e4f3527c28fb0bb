"""report.json + report.html for a quickstart run: stages, loss curves, grids, metrics, ablations."""

from __future__ import annotations

import dataclasses
import html
import json
import math
import os
import platform
import subprocess
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from PIL import Image

from cm3leon.config import atomic_write_text

# Targets a reader checks the run against (issues #7, #8); shown next to the measured value.
TARGETS = {
    ("t2i", "judge_all_correct_1obj"): 0.60,
    ("t2i", "judge_all_correct_2obj"): 0.30,
    ("caption", "caption_attribute_accuracy"): 0.80,
    ("vqa", "vqa_accuracy"): 0.80,
    ("edit", "edit_accuracy"): 0.50,
    ("control", "edge_to_image_accuracy"): 0.60,
    ("control", "seg_to_image_accuracy"): 0.60,
    ("ground", "ground_mean_iou"): 0.50,
}


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.3f}"
    return html.escape(str(v))


def _rel(out: Path, path: str | None) -> str | None:
    if not path:
        return None
    return os.path.relpath(path, out)


def _git(args: list[str], cwd: Path) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def _commit() -> str:
    """The git commit of this package's source (``+ local changes`` when it differs), or "unknown"
    (an installed wheel, no git, or a package directory that some other repository merely contains)."""
    here = Path(__file__).resolve().parent
    if _git(["ls-files", "--error-unmatch", Path(__file__).name], here) is None:
        return "unknown"
    commit = _git(["rev-parse", "--short", "HEAD"], here)
    if not commit:
        return "unknown"
    dirty = _git(["status", "--porcelain", "--untracked-files=no", "--", "."], here)
    return f"{commit} + local changes" if dirty else commit


def environment(preset: Any) -> dict[str, Any]:
    """Where and with what the run's report was made: commit, versions, threads, seeds, machine."""
    import torch

    from cm3leon.eval.harness import EvalConfig

    try:
        pkg = version("cm3leon")
    except PackageNotFoundError:  # run from a source tree that was never installed
        pkg = "unknown"
    cuda = ([torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
            if torch.cuda.is_available() else [])
    return {
        "commit": _commit(), "cm3leon": pkg, "python": sys.version.split()[0], "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(), "train_seed": getattr(preset, "seed", None),
        "eval_seed": EvalConfig().seed, "platform": platform.platform(), "cpu_count": os.cpu_count(),
        "cuda_devices": cuda,
    }


def _verdict(ok: bool | None) -> str:
    return "" if ok is None else ('<span class="ok">met</span>' if ok else '<span class="miss">MISSED</span>')


def _metrics_table(ev_pre: dict[str, Any], ev_sft: dict[str, Any]) -> tuple[list[dict[str, Any]], str]:
    """Rows for report.json and the HTML table. A target is judged on the SFT model (the ``model/``
    directory); the pretrained model's value is checked against it too, for comparison."""
    rows = []
    for task, res in ev_sft["tasks"].items():
        for k, v in res["metrics"].items():
            pre = ev_pre["tasks"].get(task, {}).get("metrics", {}).get(k)
            target = TARGETS.get((task, k))
            rows.append({"task": task, "metric": k, "sft": v, "pretrained": pre, "target": target,
                         "meets_target": None if target is None else bool(v >= target),
                         "meets_target_pretrained": None if target is None or pre is None else bool(pre >= target),
                         "judged_on": None if target is None else "sft"})

    def cell(v: Any, ok: bool | None, model: str) -> str:
        if v is None:
            return "<td>-</td>"
        mark = "" if ok is None else (f' <span class="ok" title="{model} meets the target">✓</span>' if ok
                                      else f' <span class="miss" title="{model} misses the target">✗</span>')
        value = f"<b>{_fmt(v)}</b>" if model == "SFT" else _fmt(v)
        return f'<td class="num">{value}{mark}</td>'

    body = "".join(
        f"<tr><td>{r['task']}</td><td>{r['metric']}</td>"
        + cell(r["pretrained"], r["meets_target_pretrained"], "pretrained") + cell(r["sft"], r["meets_target"], "SFT")
        + f"<td class='num'>{'&ge; ' + _fmt(r['target']) if r['target'] is not None else ''}</td>"
        + f"<td>{'' if r['meets_target'] is None else _verdict(r['meets_target']) + ' (SFT)'}</td></tr>"
        for r in rows
    )
    table = ("<table><tr><th>task</th><th>metric</th><th>pretrained model</th><th>SFT model</th><th>target</th>"
             "<th>verdict (judged on)</th></tr>" + body + "</table>")
    return rows, table


def _sample_set(t2i: Any) -> str:
    cd = f"CD-K with k={t2i.sampling.cd_k}, alpha={t2i.sampling.cd_alpha:g}"
    return {"top_p": "all CFG + top-p", "cd_k": f"all {cd}", "mix": f"half CFG + top-p, half {cd}"}[t2i.mode]


def _ablation_table(ab: dict[str, Any]) -> str:
    if not ab:
        return "<p>(ablations off in this preset)</p>"
    keys = ["judge_all_correct_1obj", "judge_all_correct_2obj", "attr_shape", "attr_color", "attr_size",
            "attr_position", "count_correct", "clip_score"]
    head = "".join(f"<th>{k}</th>" for k in keys)
    body = "".join(
        f"<tr><td>{html.escape(name)}</td>"
        + "".join(f"<td class='num'>{_fmt(m.get(k, float('nan')))}</td>" for k in keys)
        + "</tr>"
        for name, m in ab.items()
    )
    note = ("<p>Each row changes one knob of the main setting. cfg_*, retrieve_* and rerank_off judge every "
            "CFG + top-p sample (the ablation sample count per prompt, no re-ranking: rates per sample); the "
            "sampling_* rows draw that many from each sample set and judge the re-ranked pick; rerank_on is the "
            "main evaluation.</p>")
    return f'{note}<div class="wide"><table><tr><th>setting</th>{head}</tr>{body}</table></div>'


# What each grid shows, in the order of its columns (the PNG names them too).
GRID_NOTES = {
    "t2i": "the real image of the prompt, then the samples (best first when re-ranked); the judged sample is framed",
    "edit": "input image, the target (the edited scene drawn exactly), the model's output",
    "control": "the condition (edge / segmentation / depth map), the model's output, the real image",
    "ground": "the real image, the model's output for the caption and the boxes; IoU: mean box overlap",
}
LEGEND = ('<p class="legend"><span class="sw pass"></span> pass: the Shapes judge found every object right '
          '<span class="sw fail"></span> fail <span class="sw none"></span> not judged</p>')
STYLE = """body{font-family:system-ui,sans-serif;max-width:1150px;margin:2em auto;padding:0 1em;color:#1d2330;
line-height:1.45}table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:3px 8px;
text-align:left;vertical-align:top}th{background:#f2f4f7}td.num{text-align:right;font-variant-numeric:tabular-nums}
.ok{color:#1a7f37;font-weight:600}.miss{color:#cf222e;font-weight:600}
img{image-rendering:pixelated;max-width:100%;height:auto}img.grid{display:block;border:1px solid #d8dce3;margin:.3em 0}
img.curve{image-rendering:auto;max-width:560px;width:100%}figure{margin:1em 0;max-width:100%}
.grids{display:flex;flex-wrap:wrap;gap:0 2em;align-items:flex-start}.grids figure{flex:0 1 auto}
.wide{overflow-x:auto}
figcaption{color:#555;font-size:.92em}.legend{font-size:.92em;color:#555}
.sw{display:inline-block;width:.9em;height:.9em;vertical-align:-.1em;border:3px solid;margin-left:.6em}
.sw.pass{border-color:#1a7f37}.sw.fail{border-color:#cf222e}.sw.none{border-color:#969696}
dl.env{display:grid;grid-template-columns:max-content 1fr;gap:2px 1em}dl.env dt{color:#555}dl.env dd{margin:0}"""


def _examples_table(ex: list[dict[str, Any]]) -> str:
    """One row per example, columns from its keys; a ``correct`` column shown as pass / fail."""
    if not ex:
        return ""
    keys = list(ex[0])
    head = "".join(f"<th>{html.escape(k)}</th>" for k in keys)

    def td(k: str, v: Any) -> str:
        if k == "correct" and isinstance(v, bool):
            return '<td class="ok">pass</td>' if v else '<td class="miss">fail</td>'
        return f"<td>{_fmt(v)}</td>"

    body = "".join("<tr>" + "".join(td(k, e.get(k, "")) for k in keys) + "</tr>" for e in ex)
    return f"<table><tr>{head}</tr>{body}</table>"


def _environment_html(env: dict[str, Any], timings: dict[str, float], wall: float) -> str:
    machine = f"{env['platform']}, {env['cpu_count']} CPUs"
    machine += f", CUDA: {', '.join(env['cuda_devices'])}" if env["cuda_devices"] else ", no CUDA device"
    items = [("commit", env["commit"]), ("cm3leon", env["cm3leon"]), ("python", env["python"]),
             ("torch", env["torch"]), ("torch threads", env["torch_threads"]),
             ("seeds", f"training {env['train_seed']}, evaluation {env['eval_seed']}"), ("machine", machine),
             ("stage time", f"{sum(timings.values()):.0f} s in all; this invocation {wall:.0f} s")]
    dl = "".join(f"<dt>{html.escape(k)}</dt><dd>{html.escape(str(v))}</dd>" for k, v in items)
    stages = "".join(f'<tr><td>{html.escape(k)}</td><td class="num">{v:.1f}</td></tr>' for k, v in timings.items())
    return (f'<dl class="env">{dl}</dl><h3>Stage timings (seconds; a reused stage keeps the time it took when run)'
            f"</h3><table><tr><th>stage</th><th>seconds</th></tr>{stages}</table>")


def _grid_figure(out: Path, src: str, title: str, note: str) -> str:
    """A grid PNG under its caption; the figure is as wide as the PNG, so grids sit side by side."""
    try:
        with Image.open(out / src) as im:
            width = f' style="width:{im.width + 2}px"'
    except OSError:
        width = ""
    note = f": {html.escape(note)}" if note else ""
    return (f'<figure{width}><figcaption><b>{html.escape(title)}</b>{note}</figcaption>'
            f'<img class="grid" src="{html.escape(src)}" alt="{html.escape(title)}"></figure>')


def write_report(out: Path, *, preset: Any, generation: Any, timings: dict[str, float], results: dict[str, Any],
                 eval_pre: dict[str, Any], eval_sft: dict[str, Any], wall: float) -> dict[str, Any]:
    """Write ``out/report.json`` and ``out/report.html``; returns the JSON-ready dict."""
    rows, table = _metrics_table(eval_pre, eval_sft)
    env = environment(preset)
    report = {
        "preset": dataclasses.asdict(preset),
        "generation_config": generation.to_dict(),
        "wall_seconds_this_run": wall,
        "stage_seconds": timings,
        "total_stage_seconds": sum(timings.values()),
        "image_tokenizer": {k: v for k, v in results.get("image_tokenizer", {}).items() if k != "dir"},
        "encoder": {k: v for k, v in results.get("encoder", {}).items() if k != "dir"},
        "shards": {k: v for k, v in results.get("shards", {}).items() if k not in ("pretrain", "pretrain_val")},
        "sft_shards": {k: v for k, v in results.get("sft_shards", {}).items() if k not in ("sft", "sft_val")},
        "pretrain": {k: v for k, v in results.get("pretrain", {}).items() if k != "dir"},
        "sft": {k: v for k, v in results.get("sft", {}).items() if k not in ("dir", "mixture")},
        "metrics": rows,
        "ablations": eval_pre.get("ablations") or eval_sft.get("ablations", {}),
        "examples": {t: r.get("examples", []) for t, r in eval_sft["tasks"].items()},
        "examples_pretrained": {t: r.get("examples", []) for t, r in eval_pre["tasks"].items()},
        "environment": env,
    }
    atomic_write_text(out / "report.json", json.dumps(report, indent=2, default=float))

    grids = [(t, _rel(out, r.get("grid"))) for t, r in eval_sft["tasks"].items() if r.get("grid")]
    pre_grid = _rel(out, eval_pre["tasks"].get("t2i", {}).get("grid"))
    curves = [(n, _rel(out, str(Path(results[n]["dir"]) / "loss.png"))) for n in ("pretrain", "sft")
              if n in results and (Path(results[n]["dir"]) / "loss.png").exists()]
    vq = results.get("image_tokenizer", {})
    examples = ""
    for t in ("caption", "vqa"):
        ex = eval_sft["tasks"].get(t, {}).get("examples", [])
        if ex:
            examples += f"<h3>{t} (SFT model)</h3>" + _examples_table(ex)
    t2i, edit = generation.text_to_image, generation.edit.sampling
    samples = preset.eval.samples or t2i.samples
    reranker = (f"a separate re-ranker (a dual encoder trained on detailed captions for {preset.reranker_steps} steps)"
                if preset.reranker_steps else "the retrieval encoder")
    titles = {"t2i": "text-to-image, SFT model", "edit": "editing, SFT model",
              "control": "edge / segmentation / depth to image, SFT model", "ground": "grounded generation, SFT model"}
    grid_html = "".join(_grid_figure(out, g, "SFT model", "") for t, g in grids if t == "t2i")
    pre_grid_html = _grid_figure(out, pre_grid, "pretrained-only model, same prompts", "") if pre_grid else ""
    task_grids = "".join(_grid_figure(out, g, titles.get(t, t), GRID_NOTES.get(t, "")) for t, g in grids if t != "t2i")
    curves_html = "".join(f'<h3>{n}</h3><img class="curve" src="{html.escape(c)}" alt="{n} loss">' for n, c in curves)
    recall = json.dumps({k: v for k, v in results.get("encoder", {}).items() if k != "dir"})
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>cm3leon quickstart report</title>
<meta name="viewport" content="width=device-width, initial-scale=1"><style>{STYLE}</style>
</head><body>
<h1>cm3leon quickstart — preset <code>{html.escape(preset.name)}</code></h1>
<p>Shapes world → text BPE → VQ-GAN → retrieval encoder + FAISS index → shards with neighbours →
retrieval-augmented CM3 pretraining → SFT → evaluation. Total stage time {sum(timings.values()):.0f}s
(this invocation {wall:.0f}s; reused stages cost nothing).</p>
<p class="legend">Commit {html.escape(env['commit'])} · torch {html.escape(env['torch'])}, {env['torch_threads']}
thread{'' if env['torch_threads'] == 1 else 's'} · training seed {env['train_seed']} ·
{html.escape(', '.join(env['cuda_devices']) or f"{env['cpu_count']} CPUs, no CUDA device")}
(<a href="#environment">environment</a>)</p>
<h2>Metrics (held-out Shapes)</h2>
<p>Two models are evaluated: the <b>pretrained</b> model (<code>model_pretrained/</code>) and the <b>SFT</b> model
(<code>model/</code>, the pretrained model after supervised fine-tuning). Every target is judged on the SFT
model; ✓ / ✗ beside the pretrained value compares it with the same target. A dash: the pretrained model is not
evaluated on that task.</p>{table}
<p>Text-to-image uses the detailed caption as prompt, {t2i.retrieve} retrieved
document{'' if t2i.retrieve == 1 else 's'}, CFG
{t2i.sampling.guidance:g}, temperature {t2i.sampling.temperature:g}, top-p {t2i.sampling.top_p:g},
{samples} samples per prompt ({_sample_set(t2i)}) re-ranked by CLIP score with
{reranker}; "all correct" means every attribute (shape, color, size, position) of every object right
and the object count right. Editing decodes with instruct-CFG {edit.image_guidance:g} (image) /
{edit.text_guidance:g} (text); the other image tasks with CFG {generation.control.sampling.guidance:g}
(the model directory's generation_config.json).</p>
<h2>Text-to-image: real image, then samples best first</h2>
<p>Each row: {html.escape(GRID_NOTES["t2i"])}.</p>{LEGEND}
<div class="grids">{grid_html}{pre_grid_html}</div>
<h2>Editing, control and grounding (SFT model)</h2>
<div class="grids">{task_grids or "<p>(no grids)</p>"}</div>
<h2>Ablations of the pretrained model (paper §3: retrieval, CFG, sampling, re-ranking)</h2>
{_ablation_table(report['ablations'])}
<h2>Caption and VQA examples</h2>{examples}
<h2>Training</h2>{curves_html}
<p>Image tokenizer: held-out PSNR {_fmt(vq.get('val_psnr', float('nan')))} dB, codebook usage
{_fmt(vq.get('val_codebook_usage', float('nan')))}. Retrieval encoder recall: {html.escape(recall)}.</p>
<h2 id="environment">Environment</h2>{_environment_html(env, timings, wall)}
</body></html>"""
    atomic_write_text(out / "report.html", page)
    return report


# ---- own-data runs (cm3leon quickstart --data) ---------------------------------------------------
OWN_DATA_METRICS = (
    ("t2i", "fd_encoder", "FD of generated vs real held-out images on the retrieval encoder's image features "
                          "(lower is better)"),
    ("t2i", "fid", "FID with Inception-v3 (given weights only; lower is better)"),
    ("t2i", "clip_score", "CLIP score of the generated images: 100 x cos(caption, image) with the retrieval encoder"),
    ("t2i", "clip_score_real", "the same score of the real held-out images (what a perfect model would get)"),
    ("caption", "cider", "CIDEr-D of the model's captions of held-out images against their captions"),
    ("caption", "exact_match", "share of held-out images captioned with exactly their caption"),
)


def write_own_data_report(out: Path, *, plan: Any, data: dict[str, Any], generation: Any, timings: dict[str, float],
                          results: dict[str, Any], evaluation: dict[str, Any], wall: float) -> dict[str, Any]:
    """Write ``out/report.json`` and ``out/report.html`` of an own-data run; returns the JSON-ready dict."""
    rows = [{"task": t, "metric": k, "value": evaluation.get(t, {}).get("metrics", {}).get(k), "meaning": m}
            for t, k, m in OWN_DATA_METRICS if k in evaluation.get(t, {}).get("metrics", {})]
    env = environment(plan)
    plan_d = dataclasses.asdict(plan)
    est = plan_d.pop("estimates")
    report = {
        "plan": plan_d,
        "data": {k: v for k, v in data.items() if k not in ("train", "val")},
        "generation_config": generation.to_dict(),
        "wall_seconds_this_run": wall,
        "stage_seconds": timings,
        "estimated_stage_seconds": est,
        "total_stage_seconds": sum(timings.values()),
        "image_tokenizer": {k: v for k, v in results.get("image_tokenizer", {}).items() if k != "dir"},
        "encoder": {k: v for k, v in results.get("encoder", {}).items() if k != "dir"},
        "shards": {k: v for k, v in results.get("shards", {}).items() if k not in ("pretrain", "pretrain_val")},
        "pretrain": {k: v for k, v in results.get("pretrain", {}).items() if k != "dir"},
        "sft": {k: v for k, v in results.get("sft", {}).items() if k != "dir"},
        "metrics": rows,
        "examples": {t: r.get("examples", []) for t, r in evaluation.items()},
        "model_dir": str(out / "model"),
        "environment": env,
    }
    atomic_write_text(out / "report.json", json.dumps(report, indent=2, default=float))
    grid = _rel(out, evaluation.get("t2i", {}).get("grid"))
    table = "<table><tr><th>task</th><th>metric</th><th>value</th><th>what it is</th></tr>" + "".join(
        f"<tr><td>{r['task']}</td><td>{r['metric']}</td><td class='num'><b>{_fmt(r['value'])}</b></td>"
        f"<td>{html.escape(r['meaning'])}</td></tr>" for r in rows) + "</table>"
    t2i = generation.text_to_image
    t2i_m = evaluation.get("t2i", {}).get("metrics", {})
    skipped = data.get("skipped", {})
    bad = (", ".join(f"{html.escape(k)}: {v}" for k, v in skipped.items()) if skipped else "none")
    stage_rows = "".join(
        f"<tr><td>{html.escape(k)}</td><td class='num'>{f'{est[k]:.0f}' if k in est else '-'}</td>"
        f"<td class='num'>{v:.1f}</td></tr>" for k, v in timings.items())
    curves = [(n, _rel(out, str(Path(results[n]["dir"]) / "loss.png"))) for n in ("pretrain", "sft")
              if n in results and (Path(results[n]["dir"]) / "loss.png").exists()]
    curves_html = "".join(f'<h3>{n}</h3><img class="curve" src="{html.escape(c)}" alt="{n} loss">' for n, c in curves)
    cap_ex = _examples_table(evaluation.get("caption", {}).get("examples", []))
    vq = results.get("image_tokenizer", {})
    recall = json.dumps({k: v for k, v in results.get("encoder", {}).items() if k != "dir"})
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>cm3leon quickstart report (own data)</title>
<meta name="viewport" content="width=device-width, initial-scale=1"><style>{STYLE}</style>
</head><body>
<h1>cm3leon quickstart on your data — <code>{html.escape(plan.source.path)}</code></h1>
<p>{data['n_good']} good records ({html.escape(plan.source.format)}); bad rows skipped: {bad}. Held out
{plan.n_val}, trained on {plan.n_train}, at {plan.image_size} px. Text BPE → VQ-GAN ({html.escape(plan.vq_preset)})
→ retrieval encoder ({'CLIP' if plan.clip else 'in-house'}) + FAISS index → shards with neighbours →
retrieval-augmented CM3 pretraining ({plan.pretrain_steps} steps) → SFT on captioning and text-to-image
({plan.sft_steps} steps) → evaluation. The model directory is <code>model/</code>:
<code>cm3leon generate --model {html.escape(str(out / 'model'))} "&lt;caption&gt;"</code>.</p>
<p class="legend">Commit {html.escape(env['commit'])} · torch {html.escape(env['torch'])}, {env['torch_threads']}
thread{'' if env['torch_threads'] == 1 else 's'} · training seed {env['train_seed']} · total stage time
{sum(timings.values()):.0f} s (this invocation {wall:.0f} s) (<a href="#environment">environment</a>)</p>
<h2>Metrics (held-out records)</h2>{table}
<p>Text-to-image: {t2i_m.get('prompts', 0)} held-out captions, {t2i_m.get('samples_per_prompt', '?')} samples each,
CFG {t2i.sampling.guidance:g}, temperature {t2i.sampling.temperature:g}, top-p {t2i.sampling.top_p:g},
{'re-ranked by CLIP score with the retrieval encoder (the best one is scored)' if t2i_m.get('reranked')
 else 'not re-ranked'}; every best image is in <code>eval/t2i/</code>, listed with its prompt in
<code>eval/t2i.jsonl</code> for an outside judge.</p>
<h2>Text-to-image: held-out caption, the real image, then the samples</h2>
<div class="grids">{_grid_figure(out, grid, "final model", "") if grid else "<p>(no grid)</p>"}</div>
<h2>Captioning examples</h2>{cap_ex}
<h2>Training</h2>{curves_html}
<p>Image tokenizer: held-out PSNR {_fmt(vq.get('val_psnr', float('nan')))} dB, codebook usage
{_fmt(vq.get('val_codebook_usage', float('nan')))}. Retrieval encoder recall (a hit: a top-k image has the
query's caption): {html.escape(recall)}.</p>
<h2>Plan: estimated and measured seconds per stage</h2>
<p>{html.escape(plan.budget)}. Estimates come from throughput constants measured on a 2-core CPU.</p>
<table><tr><th>stage</th><th>estimated</th><th>measured</th></tr>{stage_rows}</table>
<h2 id="environment">Environment</h2>{_environment_html(env, timings, wall)}
</body></html>"""
    atomic_write_text(out / "report.html", page)
    return report

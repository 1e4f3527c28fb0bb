"""report.json + report.html for a quickstart run: stages, loss curves, grids, metrics, ablations."""

from __future__ import annotations

import dataclasses
import html
import json
import math
import os
from pathlib import Path
from typing import Any

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


def _metrics_table(ev_pre: dict[str, Any], ev_sft: dict[str, Any]) -> tuple[list[dict[str, Any]], str]:
    rows = []
    for task, res in ev_sft["tasks"].items():
        for k, v in res["metrics"].items():
            pre = ev_pre["tasks"].get(task, {}).get("metrics", {}).get(k)
            target = TARGETS.get((task, k))
            rows.append({"task": task, "metric": k, "sft": v, "pretrained": pre, "target": target,
                         "meets_target": None if target is None else bool(v >= target)})
    body = "".join(
        f"<tr><td>{r['task']}</td><td>{r['metric']}</td>"
        f"<td>{_fmt(r['pretrained']) if r['pretrained'] is not None else '-'}"
        f"</td><td><b>{_fmt(r['sft'])}</b></td><td>{_fmt(r['target']) if r['target'] is not None else ''}"
        f"{'' if r['meets_target'] is None else (' ✓' if r['meets_target'] else ' ✗')}</td></tr>"
        for r in rows
    )
    table = ("<table><tr><th>task</th><th>metric</th><th>pretrained only</th><th>after SFT</th><th>target</th></tr>"
             + body + "</table>")
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
        + "".join(f"<td>{_fmt(m.get(k, float('nan')))}</td>" for k in keys)
        + "</tr>"
        for name, m in ab.items()
    )
    note = ("<p>Each row changes one knob of the main setting. cfg_*, retrieve_* and rerank_off judge every "
            "CFG + top-p sample (the ablation sample count per prompt, no re-ranking: rates per sample); the "
            "sampling_* rows draw that many from each sample set and judge the re-ranked pick; rerank_on is the "
            "main evaluation.</p>")
    return f"{note}<table><tr><th>setting</th>{head}</tr>{body}</table>"


def write_report(out: Path, *, preset: Any, generation: Any, timings: dict[str, float], results: dict[str, Any],
                 eval_pre: dict[str, Any], eval_sft: dict[str, Any], wall: float) -> dict[str, Any]:
    """Write ``out/report.json`` and ``out/report.html``; returns the JSON-ready dict."""
    rows, table = _metrics_table(eval_pre, eval_sft)
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
    }
    atomic_write_text(out / "report.json", json.dumps(report, indent=2, default=float))

    grids = [(t, _rel(out, r.get("grid"))) for t, r in eval_sft["tasks"].items() if r.get("grid")]
    pre_grid = _rel(out, eval_pre["tasks"].get("t2i", {}).get("grid"))
    curves = [(n, _rel(out, str(Path(results[n]["dir"]) / "loss.png"))) for n in ("pretrain", "sft")
              if n in results and (Path(results[n]["dir"]) / "loss.png").exists()]
    vq = results.get("image_tokenizer", {})
    stages = "".join(f"<tr><td>{k}</td><td>{v:.1f}</td></tr>" for k, v in timings.items())
    examples = ""
    for t in ("caption", "vqa"):
        ex = eval_sft["tasks"].get(t, {}).get("examples", [])
        if ex:
            examples += f"<h3>{t}</h3><table>" + "".join(
                "<tr>" + "".join(f"<td>{html.escape(str(v))}</td>" for v in e.values()) + "</tr>" for e in ex
            ) + "</table>"
    t2i, edit = generation.text_to_image, generation.edit.sampling
    samples = preset.eval.samples or t2i.samples
    reranker = (f"a separate re-ranker (a dual encoder trained on detailed captions for {preset.reranker_steps} steps)"
                if preset.reranker_steps else "the retrieval encoder")
    grid_html = "".join(f'<h3>{html.escape(t)}</h3><img src="{html.escape(g)}">' for t, g in grids)
    pre_grid_html = (f'<h3>pretrained-only model, same prompts</h3><img src="{html.escape(pre_grid)}">'
                     if pre_grid else "")
    curves_html = "".join(f'<h3>{n}</h3><img src="{html.escape(c)}">' for n, c in curves)
    recall = json.dumps({k: v for k, v in results.get("encoder", {}).items() if k != "dir"})
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>cm3leon quickstart report</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto}}table{{border-collapse:collapse;margin:1em 0}}
td,th{{border:1px solid #ccc;padding:3px 8px;text-align:left}}img{{image-rendering:pixelated;max-width:100%}}</style>
</head><body>
<h1>cm3leon quickstart — preset <code>{html.escape(preset.name)}</code></h1>
<p>Shapes world → text BPE → VQ-GAN → retrieval encoder + FAISS index → shards with neighbours →
retrieval-augmented CM3 pretraining → SFT → evaluation. Total stage time {sum(timings.values()):.0f}s
(this invocation {wall:.0f}s; reused stages cost nothing).</p>
<h2>Metrics (held-out Shapes)</h2>{table}
<p>Text-to-image uses the detailed caption as prompt, {t2i.retrieve} retrieved
document{'' if t2i.retrieve == 1 else 's'}, CFG
{t2i.sampling.guidance:g}, temperature {t2i.sampling.temperature:g}, top-p {t2i.sampling.top_p:g},
{samples} samples per prompt ({_sample_set(t2i)}) re-ranked by CLIP score with
{reranker}; "all correct" means every attribute (shape, color, size, position) of every object right
and the object count right. Editing decodes with instruct-CFG {edit.image_guidance:g} (image) /
{edit.text_guidance:g} (text); the other image tasks with CFG {generation.control.sampling.guidance:g}
(the model directory's generation_config.json).</p>
<h2>Text-to-image (SFT model): real image, then samples best first</h2>
{grid_html}
{pre_grid_html}
<h2>Ablations of the pretrained model (paper §3: retrieval, CFG, sampling, re-ranking)</h2>\
{_ablation_table(report['ablations'])}
<h2>Caption and VQA examples</h2>{examples}
<h2>Training</h2>{curves_html}
<p>Image tokenizer: held-out PSNR {_fmt(vq.get('val_psnr', float('nan')))} dB, codebook usage
{_fmt(vq.get('val_codebook_usage', float('nan')))}. Retrieval encoder recall: {html.escape(recall)}.</p>
<h2>Stage timings (seconds)</h2><table>{stages}</table>
</body></html>"""
    atomic_write_text(out / "report.html", page)
    return report

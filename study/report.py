"""The demo's report: the analysis tables and figures plus what only the whole study knows
(model sizes, Grad-CAM panels, run times), as ``report.md`` and a self-contained
``report.html`` with every figure embedded.

Reads only files: ``DIR/analysis`` (from ``analyze``), ``DIR/runs/*/config.json``,
``history.csv`` and ``calibration.json`` (Keras), ``DIR/nnunet_work/params.json`` and
``train_settings.json`` (nnU-Net) and ``DIR/gradcam`` (from ``gradcam``); neither framework
is imported.
"""
from __future__ import annotations

import base64
import csv
import html
import json
import re
import shutil
from pathlib import Path
from typing import Any

from analysis.evaluation import paper
from analysis.imaging.io import atomic_directory, atomic_write_text
from analysis.prediction.folder import read_record
from study.new_patients import new_patients_section

SYNTHETIC = ("**The cohort is synthetic.** Every number below comes from a computer-generated CT phantom "
             "with known ground truth, not from patients; it shows that the pipeline works end to end and "
             "is not a replication of the paper's clinical results. Run the same commands on your own cohort "
             "(see docs/cohort.md: `import-dicom`, `import-bones`, `validate`, `split`) for real findings.")


def _read_csv(path: Path) -> list[dict[str, str]]:
    if not path.is_file():
        return []
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def _num(value: Any, digits: int = 2, scale: float = 1.0) -> str:
    try:
        v = float(value) * scale
    except (TypeError, ValueError):
        return "–"
    if v != v:
        return "–"
    return f"{v:,.{digits}f}"


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return out + [""]


def _samples(steps: Any, batch: Any, what: str) -> str:
    """``3,840 (240 × 16 crops of 64×64)``, or – when the steps or the batch are unknown."""
    try:
        steps, batch = int(steps), int(batch)
    except (TypeError, ValueError):
        return "–"
    return f"{steps * batch:,} ({steps} × {batch} {what})"


def model_sizes(out: Path, models: list[str]) -> list[list[Any]]:
    """Rows: model, parameters trained in this run, width, samples seen (steps x batch and the
    crop, patch or resized slice), nnU-Net's plan, paper parameters."""
    rows = []
    for model in models:
        trained, width, samples, plan = None, None, "–", "–"
        cfg = out / "runs" / model / "config.json"
        if cfg.is_file():
            data = json.loads(cfg.read_text(encoding="utf-8"))
            settings = data.get("settings", {})
            trained, width = data.get("model", {}).get("params"), settings.get("width")
            steps = (settings.get("epochs") or 0) * (settings.get("steps_per_epoch") or 0) or None
            size = settings.get("image_size")
            side = f"{size}×{size}" if size else "?"
            what = f"crops of {side}" if settings.get("task") == "segment" else f"slices resized to {side}"
            samples = _samples(steps, settings.get("batch_size"), what)
        if model == "nnunet":
            trained, width, samples, plan = _nnunet_size(out / "nnunet_work")
        pname = paper.paper_name(model)
        pparams = paper.SEGMENTATION.get(pname, {}).get("parameters") if pname else None
        rows.append([model, "–" if trained is None else f"{trained / 1e6:.2f}M",
                     "–" if width is None else f"{width:g}", samples, plan, pparams or "–"])
    return rows


def _nnunet_size(work: Path) -> tuple[Any, Any, str, str]:
    """nnU-Net's parameters, width, samples seen and plan from ``params.json`` and its training records."""
    pj = work / "params.json"
    if not pj.is_file():
        return None, None, "–", "–"
    params = json.loads(pj.read_text(encoding="utf-8"))
    from nnunet_bridge.env import WorkLayout
    from nnunet_bridge.train import training_status

    status = training_status(WorkLayout(work))
    patch = params.get("patch_size") or status.get("patch_size")
    side = "×".join(str(p) for p in patch) if patch else "?"
    samples = _samples(status.get("iterations"), status.get("batch_size"), f"patches of {side}")
    plan = params.get("plans") or status.get("plans") or "nnUNetPlans"
    features = params.get("features_per_stage")
    return (params.get("parameters"), params.get("width", 1.0), samples,
            f"`{plan}`" + (f" (features {'-'.join(map(str, features))})" if features else ""))


def thresholds_section(out: Path, models: list[str]) -> list[str]:
    """The probability threshold that cut each Keras segmenter's masks (``predict.json``)
    beside the one ``train`` calibrated on the validation patients (``calibration.json``)."""
    rows = []
    for model in models:
        record = read_record(out / "predictions" / model, missing_ok=True)
        if record is None or record.get("threshold") is None:
            continue
        cal_path = Path(record.get("model", {}).get("run", "")) / "calibration.json"
        cal = json.loads(cal_path.read_text(encoding="utf-8")) if cal_path.is_file() else {}
        rows.append([model, f"{record['threshold']:g}", _num(cal.get("threshold"), 2),
                     _num(cal.get("dice_at_threshold"), 3), _num(cal.get("dice_at_0.5"), 3)])
    if not rows:
        return []
    return ["## Segmentation thresholds", "",
            "Masks are cut at the threshold in column 2. `train` also scores every threshold on the run's "
            "validation patients (never the test patients; `runs/<model>/calibration.json`); "
            "`predict --threshold auto` would apply the best of them.", "",
            *_table(["model", "threshold used", "validation-calibrated threshold", "validation Dice there",
                     "validation Dice at 0.5"], rows), ""]


def training_section(out: Path, keras_models: list[str]) -> list[str]:
    """How each model trained: best validation score, collapse-guard events and status
    (:func:`bonemets_tf.run.training_status`; nnU-Net: :func:`nnunet_bridge.train.training_status`)."""
    from analysis.errors import InputError
    from bonemets_tf.run import read_run, training_status

    rows = []
    for model in keras_models:
        run = out / "runs" / model
        if not (run / "config.json").is_file():
            continue
        try:
            status = training_status(read_run(run))
        except InputError:  # no model.keras: the guard failed the run
            guard = json.loads((run / "config.json").read_text(encoding="utf-8")).get("guard", {})
            status = {"learned": False, "best_val": None, "guard_events": len(guard.get("events", [])),
                      "reason": f"training failed (guard outcome {guard.get('outcome', 'unknown')})"}
        word = {True: "learned", False: "**did not learn**", None: "unknown"}[status["learned"]]
        rows.append([model, _num(status["best_val"], 3), status["guard_events"], word, status["reason"]])
    work = out / "nnunet_work"
    if work.is_dir():
        from nnunet_bridge.env import WorkLayout
        from nnunet_bridge.train import training_status as nnunet_status

        status = nnunet_status(WorkLayout(work))
        word = {True: "learned", False: f"**not trained ({status['iterations']} iterations)**", None: "unknown"}
        rows.append(["nnunet", _num(status.get("validation_dice"), 3), "–", word[status["learned"]], status["reason"]])
    if not rows:
        return []
    return ["## Training", "",
            "Best validation score per Keras model (per-slice-pooled Dice for segmenters, slice AUC for "
            "detectors), the collapse guard's events (a restore of the last good epoch at half the learning "
            "rate; key `guard` of `runs/<model>/config.json`) and whether the model learned: a model that never "
            "rose above the validation score of an empty prediction did not. nnU-Net is held to the same rule: "
            "its validation score is nnU-Net's own validation of the fold at the end of training (Dice pooled "
            "over the validation patients' slices).", "",
            *_table(["model", "best validation", "guard events", "status", "reason"], rows), ""]


def gradcam_panel(gradcam_dir: Path, fig_path: Path, max_panels: int = 6) -> bool:
    """Tile the Grad-CAM overlay PNGs of ``gradcam`` into one Fig. 2-like figure."""
    pngs = sorted(gradcam_dir.glob("*.png"))[:max_panels]
    if not pngs:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(3, len(pngs))
    rows = (len(pngs) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 4 * rows), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, png in zip(axes.ravel(), pngs):
        ax.imshow(plt.imread(png))
        ax.set_title(png.stem, fontsize=8)
    fig.suptitle("Grad-CAM of the best detector on test slices (cf. paper Fig. 2). Synthetic phantom data.", fontsize=9)
    fig.tight_layout()
    fig_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(fig_path, dpi=90)
    plt.close(fig)
    return True


def write_study_report(out: Path, *, best_detector: str, cascade: str, budget: Any, timings: dict[str, float]) -> Path:
    """Write ``out/report/report.md`` and ``out/report/report.html`` (atomically, as one folder).

    Returns:
        Path of ``report.md``.
    """
    out = Path(out)
    analysis_dir = out / "analysis"
    with atomic_directory(out / "report", overwrite=True) as tmp:
        figs = tmp / "figures"
        if (analysis_dir / "figures").is_dir():
            shutil.copytree(analysis_dir / "figures", figs)
        figs.mkdir(exist_ok=True)
        has_gradcam = gradcam_panel(out / "gradcam", figs / "fig2_gradcam.png")

        seg = [r["model"] for r in _read_csv(analysis_dir / "segmentation_summary.csv")]
        det = [r["model"] for r in _read_csv(analysis_dir / "detection.csv")]
        seg = sorted(seg, key=lambda m: (m.startswith("cascade-"), m == "nnunet", m))
        md = ["# bonemets demo: the whole study on a synthetic cohort", "", SYNTHETIC, "",
              f"Reference: {paper.CITATION}.", "",
              f"Budget `{budget.name}`: {budget.cases} phantom patients of {budget.shape[0]} x {budget.shape[1]} x "
              f"{budget.shape[2]} voxels; test patients as in `dataset/splits.json`. Models are named by their "
              f"registry names; `{cascade}` is the detector-gated cascade (slices the best detector, "
              f"`{best_detector}`, calls negative are left empty, the rest segmented).", ""]
        md += ["## Model sizes (Table 2, parameters)", ""]
        md += ["Parameters of the networks trained here (nnU-Net: sum of `p.numel()` of the network its plan "
               "built), their width multiplier, the training samples seen and, for nnU-Net, the plan that ran "
               "(`nnUNetPlans` is nnU-Net's own; a derived plan names its width, batch and patch).", ""]
        md += _table(["model", "parameters trained here", "width", "samples seen", "plan", "paper"],
                     model_sizes(out, det + seg))
        md += training_section(out, [m for m in det + seg if (out / "runs" / m).is_dir()])
        md += thresholds_section(out, seg)
        analysis_md = (analysis_dir / "report.md").read_text(encoding="utf-8") if (analysis_dir / "report.md").is_file() else ""
        # the analysis report's title is replaced by ours; its sections follow as they are
        analysis_md = re.sub(r"\A# .*\n", "", analysis_md)
        md += [analysis_md.strip(), ""]
        if has_gradcam:
            md += ["## Grad-CAM (Fig. 2)", "",
                   f"Grad-CAM of `{best_detector}` on its most confident test slices: CT in a bone window, heat map, "
                   "ground-truth outline. Per-case heat-map volumes: `gradcam/<case>_gradcam.nii.gz`.", "",
                   "![Grad-CAM](figures/fig2_gradcam.png)", ""]
        md += new_patients_section(out, figs, _table)
        md += ["## Run", ""]
        md += _table(["stage", "seconds"], [[k, f"{v:.0f}"] for k, v in timings.items()])
        md += ["Outputs: `dataset/` (cohort), `runs/` (Keras RUN folders), `nnunet_work/` (nnU-Net), "
               "`predictions/` (masks and slices.csv per model), `analysis/` (CSVs), `gradcam/`, "
               "`savedmodels/` (detectors as TensorFlow SavedModels), `report/`.", ""]
        text = "\n".join(md)
        atomic_write_text(tmp / "report.md", text)
        atomic_write_text(tmp / "report.html", markdown_to_html(text, tmp, title="bonemets demo report"))
    return out / "report" / "report.md"


# --- a small Markdown renderer for the subset the reports use ----------------------

def _inline(text: str, base: Path) -> str:
    def image(m: re.Match) -> str:
        alt, src = m.group(1), m.group(2)
        path = base / src
        if path.is_file():
            data = base64.b64encode(path.read_bytes()).decode("ascii")
            return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}" style="max-width:100%">'
        return html.escape(m.group(0))

    parts = re.split(r"(!\[[^\]]*\]\([^)]+\))", text)
    out = []
    for part in parts:
        m = re.fullmatch(r"!\[([^\]]*)\]\(([^)]+)\)", part)
        if m:
            out.append(image(m))
            continue
        s = html.escape(part)
        s = re.sub(r"`([^`]+)`", r"<code>\1</code>", s)
        s = re.sub(r"\*\*([^*]+)\*\*", r"<strong>\1</strong>", s)
        s = re.sub(r"\[([^\]]+)\]\(([^)]+)\)", r'<a href="\2">\1</a>', s)
        out.append(s)
    return "".join(out)


def markdown_to_html(text: str, base: Path, *, title: str) -> str:
    """Render headings, paragraphs, lists, pipe tables and images; images are embedded
    as data URIs so the HTML file stands alone."""
    lines = text.splitlines()
    body: list[str] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        if not line.strip():
            i += 1
            continue
        m = re.match(r"(#{1,6}) (.*)", line)
        if m:
            n = len(m.group(1))
            body.append(f"<h{n}>{_inline(m.group(2), base)}</h{n}>")
            i += 1
            continue
        if line.startswith("|"):
            rows = []
            while i < len(lines) and lines[i].startswith("|"):
                rows.append(lines[i])
                i += 1
            cells = [[c.strip() for c in r.strip().strip("|").split("|")] for r in rows]
            head, data = cells[0], [r for r in cells[1:] if not all(re.fullmatch(r":?-+:?", c) for c in r)]
            body.append("<table><thead><tr>" + "".join(f"<th>{_inline(c, base)}</th>" for c in head) + "</tr></thead><tbody>"
                        + "".join("<tr>" + "".join(f"<td>{_inline(c, base)}</td>" for c in r) + "</tr>" for r in data)
                        + "</tbody></table>")
            continue
        if re.match(r"[-*] ", line):
            items = []
            while i < len(lines) and re.match(r"[-*] ", lines[i]):
                items.append(lines[i][2:])
                i += 1
            body.append("<ul>" + "".join(f"<li>{_inline(it, base)}</li>" for it in items) + "</ul>")
            continue
        para = []
        while i < len(lines) and lines[i].strip() and not re.match(r"(#{1,6} |\||[-*] )", lines[i]):
            para.append(lines[i])
            i += 1
        body.append(f"<p>{_inline(' '.join(para), base)}</p>")
    style = ("body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}"
             "table{border-collapse:collapse;margin:1em 0;font-size:90%}td,th{border:1px solid #ccc;padding:3px 8px;text-align:left}"
             "th{background:#f3f3f3}code{background:#f5f5f5;padding:0 3px}")
    return (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
            f"<style>{style}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")

"""``report.md`` and ``figures/*.png`` from the analysis tables, with the paper's values alongside.

Figures (matplotlib, Agg backend, no display needed):

* ``fig4a_detection.png``: detectors' precision, recall, F1 and AUC (like the paper's Fig. 4a),
  with 95 % patient-bootstrap intervals on the AUC bars;
* ``fig4b_segmentation.png``: segmenters' per-slice Dice, precision and recall (Fig. 4b),
  with 95 % patient-bootstrap intervals on the Dice bars;
* ``lesion_froc.png``: FROC curves of the models with probability maps;
* ``lesion_sizes.png``: lesion recall (any-overlap rule) by GT lesion volume;
* ``fig5_clinical.png``: sensitivity and specificity per clinical task and model (Fig. 5);
* ``supp_fig1_qualitative.png``: CT slice in a bone window, ground truth, each model (Supp. Fig. 1).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from analysis.evaluation import paper
from analysis.evaluation.settings import budget_sentence, differences
from analysis.imaging.display import window
from analysis.lesions import DEFAULT_BONE_HU

__all__ = ["write_report"]

SYNTHETIC_NOTE = ("**Synthetic data.** This cohort is a computer-generated phantom, not patient CT. "
                  "Its numbers test the software end to end; they say nothing about clinical performance "
                  "and are not comparable with the paper's.")


def _f(x: Any, pct: bool = False, digits: int = 2) -> str:
    """Format a table cell: NaN/None as '–', percentages with ``pct``, tiny values in e-notation."""
    if x is None:
        return "–"
    if isinstance(x, str):
        return x
    if isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_)):
        return str(int(x))
    x = float(x)
    if math.isnan(x):
        return "–"
    if pct:
        return f"{100 * x:.{digits}f}"
    if x != 0 and abs(x) < 10 ** -digits:
        return f"{x:.2e}"
    return f"{x:.{digits}f}"


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _paper(model: str, table: dict, key: str) -> str:
    name = paper.paper_name(model)
    return f"{table[name][key]:.2f}" if name in table else "–"


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _bars(path: Path, title: str, groups: list[str], series: dict[str, list[float]], ylabel: str,
          paper_series: dict[str, list[float]] | None = None, caption: str | None = None,
          errors: dict[str, list[tuple[float, float] | None]] | None = None) -> None:
    """Grouped bars; ``errors`` gives per series and group an interval (low, high) in the bars' units."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(max(5.0, 1.6 * len(groups) + 2), 3.6), dpi=110)
    names = list(series)
    width = 0.8 / max(len(names), 1)
    x = np.arange(len(groups))
    for i, name in enumerate(names):
        vals = np.array(series[name], float)
        ax.bar(x + (i - (len(names) - 1) / 2) * width, np.nan_to_num(vals), width, label=name)
        for j, iv in enumerate((errors or {}).get(name, [])):
            if iv is None or not (math.isfinite(iv[0]) and math.isfinite(iv[1]) and math.isfinite(vals[j])):
                continue
            ax.errorbar(x[j] + (i - (len(names) - 1) / 2) * width, vals[j],
                        yerr=[[max(vals[j] - iv[0], 0.0)], [max(iv[1] - vals[j], 0.0)]],
                        fmt="none", ecolor="black", elinewidth=1, capsize=3, zorder=4)
        if paper_series and name in paper_series:
            pv = np.array(paper_series[name], float)
            ax.scatter(x + (i - (len(names) - 1) / 2) * width, pv, marker="_", s=200, color="black", zorder=3,
                       label="paper" if i == 0 else None)
    ax.set_xticks(x, groups)
    ax.set_ylim(0, 100)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=7, ncol=2)
    if caption:
        fig.text(0.01, 0.01, caption, fontsize=7, color="firebrick")
    fig.tight_layout(rect=(0, 0.05 if caption else 0, 1, 1))
    fig.savefig(path)
    plt.close(fig)


def _intervals(boot: list[tuple] | None, metric: str) -> dict[str, tuple[float, float]]:
    """Per model, the bootstrap interval of ``metric`` in % (rows of ``bootstrap.csv``)."""
    return {r[0]: (100 * r[3], 100 * r[4]) for r in boot or [] if r[1] == metric}


def _fig_detection(fig_dir: Path, rows: list[tuple], caption: str | None,
                   boot: list[tuple] | None = None) -> str | None:
    if not rows:
        return None
    metrics = ["precision", "recall", "f1", "auc"]
    idx = {"precision": 3, "recall": 4, "f1": 5, "auc": 6}
    series = {r[0]: [100 * r[idx[m]] for m in metrics] for r in rows}
    paper_s = {r[0]: [paper.DETECTION[paper.paper_name(r[0])][m] for m in metrics]
               for r in rows if paper.paper_name(r[0]) in paper.DETECTION}
    auc = _intervals(boot, "slice_auc")
    errors = {m: [None, None, None, auc.get(m)] for m in series}
    _bars(fig_dir / "fig4a_detection.png", "Slice detection (cf. paper Fig. 4a)", ["Precision", "Recall", "F1", "AUC"],
          series, "%", paper_s, caption, errors)
    return "figures/fig4a_detection.png"


def _fig_segmentation(fig_dir: Path, rows: list[tuple], caption: str | None,
                      boot: list[tuple] | None = None) -> str | None:
    if not rows:
        return None
    series = {r[0]: [100 * np.nan_to_num(r[2]), 100 * np.nan_to_num(r[4]), 100 * np.nan_to_num(r[5])] for r in rows}
    paper_s = {r[0]: [paper.SEGMENTATION[paper.paper_name(r[0])][m] for m in ("dice", "precision", "recall")]
               for r in rows if paper.paper_name(r[0]) in paper.SEGMENTATION}
    dice = _intervals(boot, "slice_dice")
    errors = {m: [dice.get(m), None, None] for m in series}
    _bars(fig_dir / "fig4b_segmentation.png", "Segmentation, per slice (cf. paper Fig. 4b)",
          ["Dice", "Precision", "Recall"], series, "%", paper_s, caption, errors)
    return "figures/fig4b_segmentation.png"


def _fig_clinical(fig_dir: Path, rows: list[tuple], caption: str | None) -> str | None:
    if not rows:
        return None
    plt = _plt()
    models = sorted({r[0] for r in rows})
    labels = [f"{r[1]}/{r[2]}" for r in rows if r[0] == models[0]]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), dpi=110, sharey=True)
    width = 0.8 / len(models)
    x = np.arange(len(labels))
    for ax, col, name in ((axes[0], 7, "Sensitivity"), (axes[1], 8, "Specificity")):
        for i, m in enumerate(models):
            vals = [r[col] for r in rows if r[0] == m]
            ax.bar(x + (i - (len(models) - 1) / 2) * width, [0 if math.isnan(v) else 100 * v for v in vals],
                   width, label=m)
        ax.set_xticks(x, labels, rotation=60, ha="right", fontsize=7)
        ax.set_title(f"{name} (GT lesions as anchors)")
        ax.set_ylim(0, 100)
    axes[0].set_ylabel("%")
    axes[1].legend(fontsize=7)
    if caption:
        fig.text(0.01, 0.01, caption, fontsize=7, color="firebrick")
    fig.tight_layout(rect=(0, 0.04 if caption else 0, 1, 1))
    fig.savefig(fig_dir / "fig5_clinical.png")
    plt.close(fig)
    return "figures/fig5_clinical.png"


def _fig_qualitative(fig_dir: Path, figure: dict[str, Any] | None, caption: str | None) -> str | None:
    if figure is None or figure.get("ct") is None:
        return None
    plt = _plt()
    ct = window(figure["ct"])
    panels = [("CT (bone window)", None), ("Ground truth", figure["gt"])]
    panels += [(m, p) for m, p in sorted(figure["pred"].items())]
    fig, axes = plt.subplots(1, len(panels), figsize=(2.6 * len(panels), 3.0), dpi=110, squeeze=False)
    sx, sy = figure["spacing"][0], figure["spacing"][1]
    for ax, (name, mask) in zip(axes[0], panels):
        ax.imshow(ct, cmap="gray", vmin=0, vmax=1, aspect=sy / sx, interpolation="nearest")
        if mask is not None:
            ax.imshow(np.ma.masked_where(~mask, mask.astype(float)), cmap="autumn", alpha=0.55, vmin=0, vmax=1,
                      aspect=sy / sx, interpolation="nearest")
        ax.set_title(name, fontsize=8)
        ax.axis("off")
    fig.suptitle(f"case {figure['case']}, slice {figure['slice']} (cf. paper Supp. Fig. 1)", fontsize=9)
    if caption:
        fig.text(0.01, 0.01, caption, fontsize=7, color="firebrick")
    fig.tight_layout()
    fig.savefig(fig_dir / "supp_fig1_qualitative.png")
    plt.close(fig)
    return "figures/supp_fig1_qualitative.png"


def _fig_froc(fig_dir: Path, rows: list[tuple], summary: list[tuple], caption: str | None) -> str | None:
    if not summary:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.5, 3.8), dpi=110)
    for s in summary:
        pts = [(r[2], r[3]) for r in rows if r[0] == s[0]]
        fp = [0.0] + [p[0] for p in pts] + [8.0]
        sens = [0.0] + [p[1] for p in pts]
        sens.append(sens[-1])                      # the curve holds its last point out to 8 FP per case
        ax.step(fp, sens, where="post", label=f"{s[0]} (CPM {_f(s[-1])})")
    ax.set_xscale("symlog", linthresh=0.125)
    ax.set_xlim(0, 8)
    ax.set_xticks([0, 0.125, 0.25, 0.5, 1, 2, 4, 8], ["0", "1/8", "1/4", "1/2", "1", "2", "4", "8"])
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("false positives per case")
    ax.set_ylabel("lesion sensitivity")
    ax.set_title("FROC (candidates from probability maps)")
    ax.legend(fontsize=7)
    if caption:
        fig.text(0.01, 0.01, caption, fontsize=7, color="firebrick")
    fig.tight_layout(rect=(0, 0.05 if caption else 0, 1, 1))
    fig.savefig(fig_dir / "lesion_froc.png")
    plt.close(fig)
    return "figures/lesion_froc.png"


def _fig_sizes(fig_dir: Path, rows: list[tuple], caption: str | None) -> str | None:
    if not rows:
        return None
    models = list(dict.fromkeys(r[0] for r in rows))
    bins = list(dict.fromkeys(r[1] for r in rows))
    series = {m: [100 * (r[4] if r[4] is not None else math.nan) for r in rows if r[0] == m] for m in models}
    counts = {b: next(r[2] for r in rows if r[1] == b) for b in bins}
    _bars(fig_dir / "lesion_sizes.png", "Lesion recall by GT lesion volume (any overlap)",
          [f"{b} ml\n(n={counts[b]})" for b in bins], series, "recall %", caption=caption)
    return "figures/lesion_sizes.png"


def _lesion_section(fig_dir: Path, tables: dict[str, list[tuple]], settings: dict[str, Any],
                    caption: str | None) -> list[str]:
    """The "Lesion-level evaluation" section: definitions, tables and its two figures."""
    lw = tables.get("lesionwise.csv", [])
    sizes = tables.get("lesion_sizes.csv", [])
    froc, froc_sum = tables.get("froc.csv", []), tables.get("froc_summary.csv", [])
    boot = tables.get("bootstrap.csv", [])
    md = ["## Lesion-level evaluation", "",
          f"Lesions are {settings.get('connectivity', 26)}-connected components; every count is pooled over the "
          "analysed cases, lesion-free cases included (their predicted lesions are false positives). "
          "**Any overlap**: a GT lesion is found (tp) when a predicted lesion shares a voxel with it, else missed "
          "(fn); a predicted lesion sharing none with any GT lesion is a false positive (fp). Sensitivity = tp / "
          "GT lesions; precision = predicted lesions overlapping a GT lesion / predicted lesions; F1 = their "
          "harmonic mean; FP/case = fp / cases. **Panoptic quality** (Kirillov et al. 2019, panoptica's naive "
          "threshold matcher): one-to-one matches at IoU >= 0.5; RQ = TP / (TP + FP/2 + FN/2), SQ = mean Dice of "
          "the matched pairs, PQ = SQ x RQ. **BraTS 2023 lesion-wise Dice**: each GT lesion, dilated once with the "
          "18-neighbourhood, is matched to every predicted component touching it; its Dice is that of the union of "
          "its matches (0 without); components touching no dilated GT lesion are false positives; lesion-wise "
          "Dice = sum of GT lesions' Dice / (GT lesions + those false positives), 1 when both are 0. A missed "
          "lesion, or a case with lesions and an empty prediction, scores 0 in every mean. Values in %.", ""]
    if lw:
        md += [_table(["model", "cases", "GT", "pred", "tp", "fn", "fp", "sensitivity", "precision", "F1",
                       "FP/case", "RQ", "SQ (Dice)", "PQ (Dice)", "lesion-wise Dice"],
                      [(r[0], r[1], r[2], r[3], r[4], r[5], r[6], _f(r[7], True), _f(r[8], True), _f(r[9], True),
                        _f(r[10]), _f(r[11], True), _f(r[12], True), _f(r[13], True), _f(r[14], True))
                       for r in lw]), ""]
    else:
        md += ["No segmenter in this run.", ""]
    if sizes:
        md += ["### Recall by lesion size", "",
               "GT lesions by volume (ml; lower bound inclusive), found by the any-overlap rule.", "",
               _table(["model", "volume (ml)", "GT lesions", "found", "recall %"],
                      [(r[0], r[1], r[2], r[3], _f(r[4], True)) for r in sizes]), ""]
    md += ["### FROC", "",
           f"For models with `probabilities/<case>.nii.gz`: candidates are the connected components of probability "
           f">= {settings.get('froc_floor', 0.1)}, scored by their highest probability; at each distinct score the "
           "candidates scoring at least that are kept. Sensitivity = GT lesions touched by a kept candidate / GT "
           "lesions; FP/case = kept candidates touching no GT lesion / cases. Sensitivity at r FP/case is the best "
           "sensitivity with FP/case <= r (keeping nothing counts, at 0); CPM is their mean over r = 1/8 ... 8.", ""]
    if froc_sum:
        md += [_table(["model", "1/8", "1/4", "1/2", "1", "2", "4", "8", "CPM"],
                      [(r[0], *(_f(v, True) for v in r[1:])) for r in froc_sum]), ""]
    else:
        md += ["No model with probability maps in this run.", ""]
    md += ["### Bootstrap intervals", ""]
    if boot:
        md += [f"95% percentile intervals from {settings.get('bootstrap', '?')} resamples of patients with replacement "
               f"(seed {settings.get('seed', 0)}); replicates where a metric is undefined are left out and "
               "`n_boot` counts the rest. Fig. 4 shows the slice-AUC and per-slice Dice intervals as error bars.", "",
               _table(["model", "metric", "estimate %", "95% CI %", "replicates"],
                      [(r[0], r[1], _f(r[2], True), f"[{_f(r[3], True)}, {_f(r[4], True)}]", r[5]) for r in boot]), ""]
    else:
        md += ["Not run (`--bootstrap 0`) or no model.", ""]
    figs = [f for f in (_fig_froc(fig_dir, froc, froc_sum, caption), _fig_sizes(fig_dir, sizes, caption)) if f]
    md += [f"![{Path(f).stem}]({f})" for f in figs] + ([""] if figs else [])
    return md


def paper_order(summary: Sequence[Sequence[Any]]) -> str:
    """The paper's order of the segmenters by Dice beside ours (per-slice Dice of ``summary`` rows,
    the models the paper has), whatever ours is.

    >>> print(paper_order([("unet", 10, 0.55), ("nnunet", 10, 0.51), ("resunet", 10, 0.56)]))
    Order by Dice: paper nnUNetv2 73.4 > ResAttUNet 61.6 > ResUNet 59.0 > UNet 55.9; here resunet 56.0 > unet 55.0 > nnunet 51.0.
    """
    ours = sorted(((r[0], r[2]) for r in summary if paper.paper_name(r[0]) in paper.SEGMENTATION
                   and isinstance(r[2], (int, float)) and math.isfinite(r[2])), key=lambda mv: -mv[1])
    theirs = sorted(paper.SEGMENTATION.items(), key=lambda kv: -kv[1]["dice"])
    text = "Order by Dice: paper " + " > ".join(f"{n} {v['dice']:.1f}" for n, v in theirs)
    if ours:
        text += "; here " + " > ".join(f"{m} {100 * v:.1f}" for m, v in ours)
    return text + "."


def _status_section(rows: Sequence[Sequence[Any]]) -> list[str]:
    """The "Model training status" section: one row per flagged model (none: no section).

    Rows are ``model_flags.csv``'s: model, task, learned, flag, reason, compared.
    """
    flagged = [r for r in rows if r[3]]
    if not flagged:
        return []
    return ["## Model training status", "",
            "These models are flagged: a model that **did not learn** never rose above the validation score "
            "of an empty prediction (Dice 0 / AUC 0.5), so its numbers below describe a model that predicts "
            "nothing; **not trained** marks an nnU-Net run that did not learn by the same rule (nnU-Net's own "
            "validation Dice at the end of training, or a fold left unfinished), left "
            "out of the t-tests and the radiomics agreement; a detector whose calls are **all one class** at "
            "the threshold separates nothing there (see its calibrated threshold).", "",
            _table(["model", "task", "flag", "reason", "in comparisons"],
                   [(r[0], r[1], r[3], r[4] or "–", "yes" if r[5] else "no") for r in flagged]), ""]


def _settings_section(rows: Sequence[Sequence[Any]], compared: Sequence[str]) -> list[str]:
    """"How each model was run": ``models.csv`` as a table, and one line per setting that changes
    results and differs between the segmenters compared (:func:`analysis.evaluation.settings.differences`)."""
    if not rows:
        return []

    def cell(v: Any, fmt: str = "{}") -> str:
        if v is None or v == "":
            return "–"
        if isinstance(v, bool):
            return "yes" if v else "no"
        return fmt.format(v)

    table = []
    for r in rows:
        crop = "no" if not r[3] else f"{r[4] or 'yes'}" + (f", {r[5]} px context" if r[5] else "")
        if r[3] and r[6] is not None:
            crop += f"; checked: max |Δp| {r[6]:.3g}" + (f", Dice {r[7]:.4f}" if r[7] is not None else "")
        mirror = cell(r[8]) + (f" ({r[9]} passes)" if r[8] else "")
        network = cell(r[16] if len(r) > 16 else None) + (f" ({r[17]})" if len(r) > 17 and r[17] else "")
        spacing = r[25] if len(r) > 25 else None
        spacing = cell(None if spacing is None else "training (" + (r[24] or "?").replace("x", "×") + " mm)"
                       if spacing == "training" else spacing)
        table.append((r[0], network, r[2] or "–", crop, mirror, cell(r[10]), cell(r[11], "{:g}"), cell(r[12]),
                      cell(r[13]), cell(r[14], "{:g}"), cell(r[15]), spacing))
    lines = differences(rows, compared)
    verdict = (["**Not like for like.** " + "; ".join(lines) + ". Differences between these models' rows below "
                "may come from how they were run, not only from the models."] if lines else
               ["The compared segmenters were run alike in every setting that changes results (mirroring, "
                "threshold, crop, pixel spacing)."])
    return ["## How each model was run", "",
            "Inference settings from each model's `predict.json` (`models.csv`). Whole slices and the exact crop "
            "give the same masks; mirroring averages the logits of the slice and its mirror images; pixel spacing: "
            "each slice resampled to the spacing the model was trained at (the Keras RUN's recorded one, "
            "nnU-Net's plan's) or run at the input's own. The network column names each model with its weights' "
            "fingerprint; a fine-tune (`train --init-from`) is named after its parent.", "",
            _table(["model", "network", "framework", "crop", "mirroring", "precision", "threshold", "threshold source",
                    "folds", "tile step", "min size (voxels)", "pixel spacing"], table), "", *verdict, ""]


def write_report(out: Path, tables: dict[str, list[tuple]], *, figure: dict[str, Any] | None = None,
                 synthetic: bool = False, settings: dict[str, Any] | None = None,
                 bone_source: dict[str, str] | None = None) -> Path:
    """Write ``out/report.md`` and ``out/figures/*.png``.

    Args:
        out: output folder (exists).
        tables: rows by CSV name, as produced by :func:`analysis.evaluation.analyze.run_analysis`
            (columns in :data:`analysis.evaluation.analyze.CSV_COLUMNS`).
        figure: the qualitative panel's data: ``case``, ``slice``, ``ct`` (rows, cols) HU,
            ``gt`` and ``pred`` {model: mask} (rows, cols) bool, ``spacing`` (x, y, z) mm.
        synthetic: the cohort is a phantom; say so in the text and on every figure.
        settings: analysis settings to list.
        bone_source: per case, where bone pixels came from.

    Returns:
        Path of ``report.md``.
    """
    fig_dir = out / "figures"
    fig_dir.mkdir(parents=True, exist_ok=True)
    caption = "Synthetic phantom data: not patient CT." if synthetic else None
    settings = settings or {}
    md: list[str] = ["# bonemets analysis report", ""]
    if synthetic:
        md += [SYNTHETIC_NOTE, ""]
    md += [f"Reference: {paper.CITATION}. Paper values are the published test-set results; "
           "ours are computed from the masks and probabilities in this run.", ""]

    flags = {r[0]: r[3] for r in tables.get("model_flags.csv", []) if r[3]}
    not_compared = [r[0] for r in tables.get("model_flags.csv", []) if not r[5]]
    md += _status_section(tables.get("model_flags.csv", []))
    md += _settings_section(tables.get("models.csv", []), [r[0] for r in tables.get("model_flags.csv", []) if r[5]
                                                           and r[1] == "segment"])

    def name(model: str) -> str:
        return f"{model} (**{flags[model]}**)" if model in flags else model

    det = tables.get("detection.csv", [])
    md += ["## Slice detection", "",
           f"A slice is positive when the ground truth has any lesion voxel in it; a detector calls it positive "
           f"when its probability is >= {settings.get('threshold', 0.5)}. AUC is rank-based (ties count 1/2). "
           "Values in %.", ""]
    if det:
        md += [_table(["model", "n slices", "accuracy", "precision (paper)", "recall (paper)", "F1 (paper)",
                       "AUC (paper)"],
                      [(name(r[0]), r[7], _f(r[2], True),
                        f"{_f(r[3], True)} ({_paper(r[0], paper.DETECTION, 'precision')})",
                        f"{_f(r[4], True)} ({_paper(r[0], paper.DETECTION, 'recall')})",
                        f"{_f(r[5], True)} ({_paper(r[0], paper.DETECTION, 'f1')})",
                        f"{_f(r[6], True)} ({_paper(r[0], paper.DETECTION, 'auc')})") for r in det]), ""]
        thr = tables.get("detection_thresholds.csv", [])
        if thr:
            md += ["### Detector thresholds: fixed and validation-calibrated", "",
                   "The fixed analysis threshold and each detector's threshold of highest F1 on its validation "
                   "patients (`calibration.json` of its RUN; `predict --threshold auto`). Values in %.", "",
                   _table(["model", "threshold", "value", "positive calls", "precision", "recall", "F1"],
                          [(r[0], r[1], f"{r[2]:.3g}", f"{r[6]} / {r[7]}", _f(r[3], True), _f(r[4], True),
                            _f(r[5], True)) for r in thr]), ""]
    else:
        md += ["No detector (no `slices.csv`) in this run.", ""]

    summ = tables.get("segmentation_summary.csv", [])
    cases = tables.get("segmentation_cases.csv", [])
    md += ["## Segmentation", "",
           "Per slice: over the slices where the ground truth has lesion voxels (the same slices for every model; "
           "an empty prediction there scores 0). Per case: 3D over the whole volume, left empty for a case with no "
           "ground-truth lesion. Values in %; per-slice Dice also as mean ± sd.", ""]
    budgets = budget_sentence(tables.get("models.csv", []), [r[0] for r in summ])
    if budgets:
        md += [budgets, ""]
    if summ:
        md += [paper_order(summ), ""]
        rows = []
        for r in summ:
            case_vals = np.array([c[2] for c in cases if c[0] == r[0]], float)
            case_mean = float(np.nanmean(case_vals)) if np.isfinite(case_vals).any() else math.nan
            pname = paper.paper_name(r[0])
            pd = (f"{paper.SLICE_DICE[pname][0]:.2f} ± {paper.SLICE_DICE[pname][1]:.2f}" if pname in paper.SLICE_DICE
                  else "–")
            rows.append((name(r[0]), r[1], f"{_f(r[2], True)} ({_paper(r[0], paper.SEGMENTATION, 'dice')})",
                         f"{_f(r[4], True)} ({_paper(r[0], paper.SEGMENTATION, 'precision')})",
                         f"{_f(r[5], True)} ({_paper(r[0], paper.SEGMENTATION, 'recall')})",
                         f"{_f(r[2])} ± {_f(r[3])} ({pd})", _f(case_mean, True)))
        md += [_table(["model", "n slices", "Dice (paper)", "precision (paper)", "recall (paper)",
                       "slice Dice mean ± sd (paper)", "case Dice"], rows), ""]
        tt = tables.get("ttests.csv", [])
        md += ["### Paired t-tests on per-slice Dice", "",
               f"Two-sided paired t-tests on the common slices, Holm correction across pairs "
               f"(paper: {paper.TTEST_NOTE})."
               + (f" Left out (not trained): {', '.join(not_compared)}." if not_compared else ""), ""]
        md += [_table(["model A", "model B", "n", "mean diff", "sd diff", "t", "dof", "p", "p (Holm)"],
                      [(r[0], r[1], r[2], _f(r[3], digits=3), _f(r[4], digits=3), _f(r[5]), r[6], _f(r[7]), _f(r[8]))
                       for r in tt]) if tt else "Fewer than two segmenters: no tests.", ""]
    else:
        md += ["No segmenter (no `<case>.nii.gz` masks) in this run.", ""]

    icc = tables.get("radiomics_icc.csv", [])
    md += ["## Radiomics agreement (ICC)", "",
           "pyradiomics on the CT inside each ground-truth lesion and its matched predicted lesion (binWidth 25, "
           "no normalisation, original image). ICC(A,1): two-way random, absolute agreement, single rater, per "
           "feature over the pairs; per class, the mean ICC and the means of the 95% CI bounds. Features constant "
           "over all pairs have no ICC and are counted, not averaged. Bands (Koo & Li 2016): < 0.5 poor, "
           "0.5-0.75 moderate, 0.75-0.9 good, > 0.9 excellent."
           + (f" Left out (not trained): {', '.join(not_compared)}." if not_compared else ""), ""]
    if icc:
        rows = []
        for r in icc:
            pname = paper.paper_name(r[0])
            pv = paper.ICC.get(pname, {}).get(r[1])
            ci = f"{_f(r[4], digits=3)} [{_f(r[5], digits=3)}, {_f(r[6], digits=3)}]"
            rows.append((r[0], r[1], r[2], r[8], r[3], r[7], ci, "–" if pv is None else f"{pv:.2f}"))
        md += [_table(["model", "class", "pairs", "skipped pairs", "features", "constant", "ICC [95% CI]", "paper"],
                      rows), ""]
    else:
        md += ["Not run (`--no-radiomics`) or no matched lesion pairs.", ""]

    cl = tables.get("clinical.csv", [])
    md += ["## Clinical lesion tasks", "",
           "Ground-truth lesions are the anchors: for each one, the model's answer is the attribute of its matched "
           "predicted lesion (most shared voxels; computed on the prediction's own lesions), and an unmatched lesion "
           "is a negative answer. One category versus the rest. `detection/lesion`: tp matched, fn unmatched "
           "ground-truth lesions, fp predicted lesions that touch none; no true negatives exist, so specificity is "
           "undefined. `detection/slice`: every analysed slice, positive when it holds any lesion voxel. "
           f"Diffuse: the lesion covers >= {settings.get('diffuse_fraction', 0.6)} of the 2D bone region it touches "
           f"in some slice. Clustered: another lesion within {settings.get('cluster_slices', 10)} slices. "
           "Weight-bearing: spine, pelvis or lower extremity. Sensitivity = tp/(tp+fn), specificity = tn/(tn+fp); "
           "– where the denominator is 0.", ""]
    if cl:
        md += [_table(["model", "task", "category", "tp", "fp", "fn", "tn", "sensitivity %", "specificity %"],
                      [(r[0], r[1], r[2], r[3], r[4], r[5], _f(r[6]), _f(r[7], True), _f(r[8], True)) for r in cl]), ""]
    sources = sorted(set((bone_source or {}).values()))
    if sources:
        md += [f"Bone pixels for the diffuse/focal rule came from: {', '.join(sources)} "
               f"(without `bonesTr`, CT >= {settings.get('bone_hu', DEFAULT_BONE_HU):g} HU; "
               "bone identity is then unknown).", ""]

    md += _lesion_section(fig_dir, tables, settings, caption)

    boot = tables.get("bootstrap.csv")
    figs = [f for f in (_fig_detection(fig_dir, det, caption, boot), _fig_segmentation(fig_dir, summ, caption, boot),
                        _fig_clinical(fig_dir, cl, caption), _fig_qualitative(fig_dir, figure, caption)) if f]
    if figs:
        md += ["## Figures", ""]
        if synthetic:
            md += ["All figures show synthetic phantom data.", ""]
        md += [f"![{Path(f).stem}]({f})" for f in figs] + [""]
    if settings:
        md += ["## Settings", "", _table(["setting", "value"], [(k, v) for k, v in settings.items()]), ""]
    path = out / "report.md"
    path.write_text("\n".join(md), encoding="utf-8")
    return path

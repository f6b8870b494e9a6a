"""End to end: `analyze` on a tiny cohort written in tmp_path; bad inputs exit 2 with no OUT."""
from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from analysis.cohort.layout import write_dataset_json
from analysis.errors import InputError
from analysis.evaluation.analyze import CSV_COLUMNS, run_analysis
from analysis.imaging.io import Geometry, write_array, write_mask

GEO = Geometry(size=(16, 16, 8), spacing=(1.0, 1.0, 2.0), origin=(0.0, 0.0, 0.0),
               direction=(1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0))
REPO = Path(__file__).resolve().parents[1]


def _case(seed: int):
    """CT (z, y, x) with air along the last column, a spine block and a rib block, two lesions, and the bone map."""
    rng = np.random.default_rng(seed)
    ct = rng.normal(40, 10, GEO.shape).astype(np.int16)
    ct[:, :, -1] = -1000                         # air beside the patient: a CT's field of view holds some
    bones = np.zeros(GEO.shape, np.uint8)
    bones[:, 2:8, 2:8] = 2                       # spine block 6x6 in every slice
    bones[:, 10:14, 10:15] = 3                   # rib block 4x5
    ct[bones > 0] = rng.normal(300, 30, (bones > 0).sum())
    gt = np.zeros(GEO.shape, np.uint8)
    gt[1:4, 3:6, 3:7] = 1                        # lesion 1 in the spine: 3 slices, 36 voxels, 12/36 of the block
    gt[5:7, 10:14, 10:15] = 1                    # lesion 2 fills the rib block: diffuse, 40 voxels
    ct[gt > 0] = rng.normal(700, 60, (gt > 0).sum())
    return ct, gt, bones


def make_cohort(root: Path, n: int = 2) -> tuple[Path, Path]:
    ds, pred = root / "DATASET", root / "PRED"
    for i in range(n):
        case = f"case_{i:02d}"
        ct, gt, bones = _case(i)
        write_array(ct, GEO, ds / "imagesTr" / f"{case}_0000.nii.gz")
        write_mask(gt, GEO, ds / "labelsTr" / f"{case}.nii.gz")
        write_array(bones, GEO, ds / "bonesTr" / f"{case}.nii.gz")
        write_mask(gt, GEO, pred / "perfect" / f"{case}.nii.gz")
        partial = gt.copy()
        partial[5:7] = 0                         # misses the rib lesion
        partial[0, 14, 0] = 1                    # one false-positive voxel
        write_mask(partial, GEO, pred / "partial" / f"{case}.nii.gz")
        write_probabilities(partial, pred / "partial" / "probabilities" / f"{case}.nii.gz", as_uint8=i % 2 == 1)
    (pred / "partial" / "dicom_seg").mkdir()                 # part of the model folder, never a model or case
    (pred / "partial" / "dicom_seg" / "case_00.dcm").write_bytes(b"DICM")
    write_dataset_json(ds, n)
    rows = ["case,slice,probability"]
    for i in range(n):
        probs = [0.1, 0.9, 0.8, 0.4, 0.2, 0.7, 0.6, 0.55]   # truth: slices 1,2,3,5,6 positive
        rows += [f"case_{i:02d},{z},{p}" for z, p in enumerate(probs)]
    (pred / "detector").mkdir(parents=True)
    (pred / "detector" / "slices.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    return ds, pred


def write_probabilities(partial: np.ndarray, path: Path, as_uint8: bool) -> None:
    """The partial model's voxel probabilities: 0.8 on its spine lesion, 77/255 on its FP voxel, and a
    0.2 candidate on the rib lesion it misses; uint8 with scl_slope 1/255 (nibabel) or float32."""
    import nibabel as nib

    from analysis.prediction.probabilities import read_probability

    probs = np.where(partial > 0, 204, 0)                       # 204/255 = 0.8
    probs[0, 14, 0] = 77                                        # 0.302
    probs[5:7, 10:12, 10:12] = 51                               # 0.2
    img = nib.Nifti1Image(probs.astype(np.uint8).transpose(2, 1, 0),
                          np.diag([-GEO.spacing[0], -GEO.spacing[1], GEO.spacing[2], 1.0]))
    img.set_data_dtype(np.uint8)
    img.header.set_slope_inter(1 / 255, 0)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(img, path)
    if not as_uint8:   # the same values as float32 (bit for bit, so both cases share operating points)
        write_array(read_probability(path), GEO, path)


def read(out: Path, name: str) -> list[dict[str, str]]:
    with open(out / name, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        assert tuple(reader.fieldnames[: len(CSV_COLUMNS[name])]) == CSV_COLUMNS[name]
        return list(reader)


@pytest.fixture(scope="module")
def analysed(tmp_path_factory):
    root = tmp_path_factory.mktemp("analyze")
    ds, pred = make_cohort(root)
    out = run_analysis(ds, pred, root / "OUT", cases="all", radiomics=True, jobs=1)
    return root, ds, pred, out


def test_outputs_exist_with_columns(analysed):
    _, _, _, out = analysed
    for name in CSV_COLUMNS:
        assert (out / name).is_file(), name
        read(out, name)
    assert (out / "report.md").is_file()
    figs = sorted(p.name for p in (out / "figures").glob("*.png"))
    assert figs == ["fig4a_detection.png", "fig4b_segmentation.png", "fig5_clinical.png", "lesion_froc.png",
                    "lesion_sizes.png", "supp_fig1_qualitative.png"]
    config = json.loads((out / "config.json").read_text(encoding="utf-8"))
    assert config["segmenters"] == ["partial", "perfect"] and config["detectors"] == ["detector"]
    assert config["froc_models"] == ["partial"]
    assert (config["settings"]["froc_floor"], config["settings"]["bootstrap"], config["settings"]["seed"]) == (0.1, 1000, 0)
    report = (out / "report.md").read_text(encoding="utf-8")
    assert "## Lesion-level evaluation" in report and "figures/lesion_froc.png" in report
    assert config["settings"]["connectivity"] == 26 and "numpy" in config["versions"]


def test_segmentation_values(analysed):
    out = analysed[3]
    cases = {(r["model"], r["case"]): r for r in read(out, "segmentation_cases.csv")}
    assert float(cases[("perfect", "case_00")]["dice"]) == 1.0
    p = cases[("partial", "case_00")]
    assert (int(p["gt_voxels"]), int(p["pred_voxels"])) == (76, 37)
    assert float(p["dice"]) == pytest.approx(2 * 36 / (76 + 37))
    assert float(p["recall"]) == pytest.approx(36 / 76)
    slices = [r for r in read(out, "segmentation_slices.csv") if r["model"] == "partial" and r["case"] == "case_00"]
    assert [int(r["slice"]) for r in slices] == [1, 2, 3, 5, 6]
    assert [float(r["dice"]) for r in slices] == [1.0, 1.0, 1.0, 0.0, 0.0]
    summary = {r["model"]: r for r in read(out, "segmentation_summary.csv")}
    assert int(summary["partial"]["n_slices"]) == 10
    assert float(summary["partial"]["dice_mean"]) == pytest.approx(0.6)
    assert float(summary["partial"]["dice_sd"]) == pytest.approx(np.std([1, 1, 1, 0, 0] * 2, ddof=1))
    (t,) = read(out, "ttests.csv")
    assert (t["model_a"], t["model_b"], int(t["n"]), int(t["dof"])) == ("partial", "perfect", 10, 9)
    assert float(t["mean_diff"]) == pytest.approx(-0.4)
    from scipy.stats import ttest_rel

    ref = ttest_rel([1, 1, 1, 0, 0] * 2, [1.0] * 10)
    assert float(t["t"]) == pytest.approx(ref.statistic, rel=1e-8) and float(t["p_holm"]) == pytest.approx(ref.pvalue, rel=1e-8)


def test_lesions_and_clinical(analysed):
    out = analysed[3]
    les = read(out, "lesions.csv")
    gt = [r for r in les if r["source"] == "gt" and r["case"] == "case_00"]
    assert [(r["z_first"], r["z_last"], r["voxels"], r["bone"], r["diffuse"], r["weight_bearing"]) for r in gt] == [
        ("1", "3", "36", "spine", "false", "true"), ("5", "6", "40", "rib", "true", "false")]
    assert float(gt[0]["volume_ml"]) == pytest.approx(36 * 2 / 1000)
    assert [r["n_neighbours"] for r in gt] == ["1", "1"]          # gap 2 slices <= 10
    assert all(r["matched_gt_id"] == "" for r in gt)
    partial = [r for r in les if r["source"] == "partial" and r["case"] == "case_00"]
    assert sorted(r["matched_gt_id"] for r in partial) == ["", "1"]   # the FP voxel matches nothing
    cl = {(r["model"], r["task"], r["category"]): r for r in read(out, "clinical.csv")}
    det = cl[("partial", "detection", "lesion")]
    assert (det["tp"], det["fp"], det["fn"], det["tn"], det["specificity"]) == ("2", "2", "2", "", "")
    assert float(det["sensitivity"]) == 0.5
    rib = cl[("partial", "location", "rib")]
    assert (rib["tp"], rib["fn"], rib["tn"]) == ("0", "2", "2")
    assert float(cl[("perfect", "diffuse", "diffuse")]["sensitivity"]) == 1.0
    sl = cl[("partial", "detection", "slice")]                     # FP voxel on slice 0 of each case
    assert (sl["tp"], sl["fp"], sl["fn"], sl["tn"]) == ("6", "2", "4", "4")


def test_detection_and_radiomics(analysed):
    out = analysed[3]
    (d,) = read(out, "detection.csv")
    # per case: positives 1,2,3,5,6; >= 0.5 predicted: 1,2,5,6,7 -> tp 4, fp 1, fn 1, tn 2
    assert float(d["precision"]) == pytest.approx(0.8) and float(d["recall"]) == pytest.approx(0.8)
    assert float(d["accuracy"]) == pytest.approx(6 / 8) and int(d["n_slices"]) == 16
    icc = {(r["model"], r["feature_class"]): r for r in read(out, "radiomics_icc.csv")}
    first = icc[("perfect", "firstorder")]
    assert int(first["n_pairs"]) == 4 and float(first["icc"]) == 1.0
    assert int(icc[("partial", "firstorder")]["n_pairs"]) == 2
    feats = read(out, "radiomics_features.csv")
    perfect = [r for r in feats if r["model"] == "perfect"]
    assert perfect and all(r["gt_value"] == r["pred_value"] for r in perfect)


def test_identical_inputs_give_identical_csvs(analysed, tmp_path):
    root, ds, pred, out = analysed
    again = run_analysis(ds, pred, tmp_path / "again", cases="all", radiomics=True, jobs=2)
    for name in CSV_COLUMNS:
        assert (out / name).read_bytes() == (again / name).read_bytes(), name


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "cli.py"), *args], capture_output=True, text=True, cwd=REPO, encoding="utf-8", errors="replace")


@pytest.mark.parametrize("damage,needle", [
    ("geometry", "perfect/case_01.nii.gz: spacing"),
    ("missing", "partial/case_00.nii.gz: missing prediction"),
    ("csv_column", "slices.csv: missing column(s) probability"),
    ("csv_range", "slices.csv: line 2: probability 1.5 outside [0, 1]"),
    ("csv_slice", "slices.csv: case case_01 has no probability for 1 slice(s) (7)"),
    ("nonbinary", "perfect/case_00.nii.gz: not a binary mask"),
    ("not_ct", "case_00_0000.nii.gz: values 0..3000 with nothing below 0: not CT in Hounsfield units"),
])
def test_bad_inputs_exit_2_and_write_nothing(tmp_path, damage, needle):
    ds, pred = make_cohort(tmp_path)
    if damage == "geometry":
        g = Geometry(GEO.size, (1.0, 1.0, 3.0), GEO.origin, GEO.direction)
        write_mask(np.zeros(GEO.shape), g, pred / "perfect" / "case_01.nii.gz")
    elif damage == "missing":
        (pred / "partial" / "case_00.nii.gz").unlink()
    elif damage == "csv_column":
        (pred / "detector" / "slices.csv").write_text("case,slice,prob\ncase_00,0,0.5\n", encoding="utf-8")
    elif damage == "csv_range":
        (pred / "detector" / "slices.csv").write_text("case,slice,probability\ncase_00,0,1.5\n", encoding="utf-8")
    elif damage == "csv_slice":
        lines = (pred / "detector" / "slices.csv").read_text(encoding="utf-8").splitlines()
        (pred / "detector" / "slices.csv").write_text("\n".join(lines[:-1]) + "\n", encoding="utf-8")
    elif damage == "nonbinary":
        write_array(np.full(GEO.shape, 2, np.uint8), GEO, pred / "perfect" / "case_00.nii.gz")
    elif damage == "not_ct":  # an MR-like image in the cohort
        mr = np.linspace(0, 3000, int(np.prod(GEO.shape)), dtype=np.float32).reshape(GEO.shape)
        write_array(mr, GEO, ds / "imagesTr" / "case_00_0000.nii.gz")
    out = tmp_path / "OUT"
    args = ["analyze", "--dataset", str(ds), "--predictions", str(pred), "--out", str(out), "--cases", "all",
            "--no-radiomics"]
    if damage == "geometry":   # one real process: exit status and stderr as a user sees them
        r = _cli(*args)
        code, stderr = r.returncode, r.stderr
    else:
        from cli import main

        r = CliRunner().invoke(main, args)
        code, stderr = r.exit_code, r.stderr
    assert code == 2, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], stderr
    assert "Traceback" not in stderr
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".OUT")]


def test_refuses_non_empty_out_without_overwrite(tmp_path):
    ds, pred = make_cohort(tmp_path, n=1)
    out = tmp_path / "OUT"
    out.mkdir()
    (out / "keep.txt").write_text("x", encoding="utf-8")
    with pytest.raises(InputError, match="--overwrite"):
        run_analysis(ds, pred, out, cases="all", radiomics=False)
    assert (out / "keep.txt").read_text(encoding="utf-8") == "x"
    run_analysis(ds, pred, out, cases="all", radiomics=False, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "lesions.csv").is_file()


def test_cli_runs_and_connectivity_option(tmp_path):
    ds, pred = make_cohort(tmp_path, n=1)
    from cli import main

    result = CliRunner().invoke(main, ["analyze", "--dataset", str(ds), "--predictions", str(pred), "--out",
                                       str(tmp_path / "OUT"), "--cases", "all", "--no-radiomics", "--connectivity", "6"])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "OUT" / "config.json").read_text(encoding="utf-8"))["settings"]["connectivity"] == 6
    assert len(read(tmp_path / "OUT", "radiomics_icc.csv")) == 0


def test_analysis_imports_no_framework():
    code = ("import sys, analysis.evaluation.analyze, analysis.evaluation.report, analysis.evaluation.radiomics, analysis.evaluation.stats, analysis.evaluation.paper, "
            "analysis.evaluation.metrics.overlap, analysis.lesions, analysis.evaluation.metrics.clinical, analysis.evaluation.metrics.detection, "
            "analysis.evaluation.metrics.lesionwise, analysis.evaluation.metrics.froc, analysis.evaluation.bootstrap; "
            "bad = [m for m in ('torch', 'tensorflow', 'keras') if m in sys.modules]; assert not bad, bad")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, encoding="utf-8", errors="replace")
    assert r.returncode == 0, r.stderr


def test_without_bone_map_uses_hu_threshold_and_marks_synthetic(tmp_path):
    import shutil

    ds, pred = make_cohort(tmp_path, n=1)
    shutil.rmtree(ds / "bonesTr")
    out = run_analysis(ds, pred, tmp_path / "OUT", cases="all", radiomics=False, synthetic=True)
    gt = [r for r in read(out, "lesions.csv") if r["source"] == "gt"]
    assert [(r["bone"], r["diffuse"], r["weight_bearing"]) for r in gt] == [
        ("unknown", "false", "false"), ("unknown", "true", "false")]
    assert float(gt[0]["diffuse_fraction"]) == pytest.approx(12 / 36)
    config = json.loads((out / "config.json").read_text(encoding="utf-8"))
    assert config["bone_source"] == {"case_00": "CT >= 150 HU"} and config["synthetic"] is True
    assert "Synthetic data" in (out / "report.md").read_text(encoding="utf-8")


def test_lesion_level_values(analysed):
    out = analysed[3]
    lw = {r["model"]: r for r in read(out, "lesionwise.csv")}
    # partial, per case: spine lesion found exactly (Dice 1), rib lesion missed, one FP voxel far from both
    p = lw["partial"]
    assert [p[k] for k in ("n_cases", "n_gt", "n_pred", "tp", "fn", "fp")] == ["2", "4", "4", "2", "2", "2"]
    assert [float(p[k]) for k in ("sensitivity", "precision", "f1", "fp_per_case")] == [0.5, 0.5, 0.5, 1.0]
    assert [float(p[k]) for k in ("rq", "sq_dice", "pq_dice")] == [0.5, 1.0, 0.5]      # 2 / (2 + 2/2 + 2/2)
    assert float(p["lw_dice"]) == pytest.approx(2 / (4 + 2))
    assert all(float(lw["perfect"][k]) == 1.0 for k in ("sensitivity", "precision", "rq", "pq_dice", "lw_dice"))
    sizes = [(r["model"], r["size_bin"], r["n_gt"], r["detected"], r["sensitivity"]) for r in read(out, "lesion_sizes.csv")]
    # 36 and 40 voxels of 2 mm^3: 0.072 and 0.08 ml, both below 0.1 ml
    assert sizes[:4] == [("partial", "<0.1", "4", "2", "0.5"), ("partial", "0.1-1", "0", "0", ""),
                         ("partial", "1-10", "0", "0", ""), ("partial", ">=10", "0", "0", "")]


def test_froc_from_probability_maps(analysed):
    out = analysed[3]
    rows = [(r["model"], float(r["threshold"]), float(r["fp_per_case"]), float(r["sensitivity"]))
            for r in read(out, "froc.csv")]
    # float32 (case_00) and uint8 / 255 (case_01) maps give the same points: 204/255, 77/255, 51/255
    assert [r[0] for r in rows] == ["partial"] * 3
    assert [r[1] for r in rows] == pytest.approx([204 / 255, 77 / 255, 51 / 255], abs=1e-6)
    assert [(r[2], r[3]) for r in rows] == [(0.0, 0.5), (1.0, 0.5), (1.0, 1.0)]
    (s,) = read(out, "froc_summary.csv")
    sens = [float(s[f"sens_at_{r}"]) for r in ("0.125", "0.25", "0.5", "1", "2", "4", "8")]
    assert sens == [0.5, 0.5, 0.5, 1.0, 1.0, 1.0, 1.0] and float(s["cpm"]) == pytest.approx(5.5 / 7)


def test_bootstrap_estimates_match_the_tables(analysed):
    out = analysed[3]
    boot = {(r["model"], r["metric"]): r for r in read(out, "bootstrap.csv")}
    assert sorted(boot) == [("detector", "slice_auc")] + [(m, k) for m in ("partial", "perfect") for k in
                                                          ("case_dice", "lesion_sensitivity", "lw_dice", "slice_dice")]
    summary = {r["model"]: r for r in read(out, "segmentation_summary.csv")}
    lw = {r["model"]: r for r in read(out, "lesionwise.csv")}
    (det,) = read(out, "detection.csv")
    assert boot[("partial", "slice_dice")]["estimate"] == summary["partial"]["dice_mean"]
    assert boot[("partial", "lesion_sensitivity")]["estimate"] == lw["partial"]["sensitivity"]
    assert boot[("partial", "lw_dice")]["estimate"] == lw["partial"]["lw_dice"]
    assert boot[("detector", "slice_auc")]["estimate"] == det["auc"]
    # the two cases are identical, so every resample gives the estimate back
    assert all(r["ci_low"] == r["estimate"] == r["ci_high"] and r["n_boot"] == "1000" for r in boot.values())


def test_bootstrap_resamples_patients(tmp_path):
    ds, pred = make_cohort(tmp_path, n=3)
    write_mask(np.zeros(GEO.shape, np.uint8), GEO, pred / "partial" / "case_02.nii.gz")   # one empty prediction
    args = dict(cases="all", radiomics=False)
    a = run_analysis(ds, pred, tmp_path / "A", bootstrap=200, seed=1, **args)
    b = run_analysis(ds, pred, tmp_path / "B", bootstrap=200, seed=1, **args)
    assert (a / "bootstrap.csv").read_bytes() == (b / "bootstrap.csv").read_bytes()
    sens = {r["metric"]: r for r in read(a, "bootstrap.csv") if r["model"] == "partial"}["lesion_sensitivity"]
    # per case found/GT lesions: 1/2, 1/2, 0/2 -> pooled 1/3; resamples range from 0 to 1/2
    assert float(sens["estimate"]) == pytest.approx(1 / 3)
    assert 0.0 <= float(sens["ci_low"]) < 1 / 3 < float(sens["ci_high"]) <= 0.5
    (lw,) = [r for r in read(a, "lesionwise.csv") if r["model"] == "partial"]
    assert float(lw["lw_dice"]) == pytest.approx(2 / (6 + 2))      # the empty prediction scores 0, not NaN
    none = run_analysis(ds, pred, tmp_path / "D", bootstrap=0, **args)
    assert read(none, "bootstrap.csv") == []


@pytest.mark.parametrize("damage,needle", [
    ("missing", "partial/probabilities/case_01.nii.gz: missing probability map of model partial"),
    ("range", "partial/probabilities/case_00.nii.gz: probabilities outside [0, 1]"),
    ("geometry", "partial/probabilities/case_00.nii.gz: spacing"),
])
def test_bad_probability_maps_are_refused(tmp_path, damage, needle):
    ds, pred = make_cohort(tmp_path)
    path = pred / "partial" / "probabilities" / ("case_01.nii.gz" if damage == "missing" else "case_00.nii.gz")
    if damage == "missing":
        path.unlink()
    elif damage == "range":
        write_array(np.full(GEO.shape, 2.0, np.float32), GEO, path)
    else:
        write_array(np.zeros(GEO.shape, np.float32), Geometry(GEO.size, (1.0, 1.0, 3.0), GEO.origin, GEO.direction), path)
    with pytest.raises(InputError) as err:
        run_analysis(ds, pred, tmp_path / "OUT", cases="all", radiomics=False)
    assert needle in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "OUT").exists()


def test_cli_lesion_level_options(tmp_path):
    ds, pred = make_cohort(tmp_path, n=1)
    from cli import main

    base = ["analyze", "--dataset", str(ds), "--predictions", str(pred), "--cases", "all", "--no-radiomics"]
    result = CliRunner().invoke(main, base + ["--out", str(tmp_path / "OUT"), "--froc-floor", "0.5", "--bootstrap", "7",
                                              "--seed", "3"])
    assert result.exit_code == 0, result.output
    settings = json.loads((tmp_path / "OUT" / "config.json").read_text(encoding="utf-8"))["settings"]
    assert (settings["froc_floor"], settings["bootstrap"], settings["seed"]) == (0.5, 7, 3)
    assert {r["n_boot"] for r in read(tmp_path / "OUT", "bootstrap.csv")} == {"7"}
    assert [float(r["threshold"]) for r in read(tmp_path / "OUT", "froc.csv")] == pytest.approx([0.8])
    bad = CliRunner().invoke(main, base + ["--out", str(tmp_path / "BAD"), "--froc-floor", "0"])
    assert bad.exit_code == 2 and "--froc-floor" in bad.output

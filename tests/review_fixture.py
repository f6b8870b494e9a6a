"""A predicted study for the review's tests, made without a framework in seconds.

A phantom CT written as a DICOM series (patient name ``DOE^JANE``, which no log may show), and its
prediction written by the project's own prediction pipeline (:func:`analysis.prediction.request.predict_folder`
with the runner, ``lesions.csv``, the SEG and the TID 1500 report, exactly as ``predict --images
--dicom-seg --sr`` writes them) from a network-free "model": a voxel is lesion when it is at least
600 HU. Lesions by design (index ``(slice, row, col)`` ranges, identity geometry):

* ``hot``: 900 HU, slices 2-5, rows 22-28, cols 16-22 (found; a reader accepts it);
* ``island``: 1300 HU, slices 7-9, rows 40-44, cols 44-48 (found; a bone island: rejected);
* ``warm``: 800 HU, slices 6-9, rows 22-27, cols 34-40 (found; accepted);
* ``missed``: 500 HU, slices 2-5, rows 38-44, cols 18-24 (below the model's 600 HU; a reader adds it
  by a click: the growing rule's 400 HU takes exactly these voxels, the 250 HU bone around it not).
"""
from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np
import pydicom

from analysis.cohort.examples import write_dicom_series
from analysis.imaging.io import Geometry
from analysis.prediction.request import PredictRequest, WingRun, plan_request, predict_folder
from analysis.prediction.runner import Network

GEOMETRY = Geometry(size=(64, 64, 12), spacing=(0.8, 0.8, 2.5), origin=(-25.6, -25.6, 0.0),
                    direction=(1, 0, 0, 0, 1, 0, 0, 0, 1))
PATIENT_NAME = "DOE^JANE"
FINGERPRINT = "f1e2d3c4b5a6"
#: The designed lesions: ``(slices, rows, cols)`` half-open index ranges and HU.
LESIONS = {"hot": ((2, 6), (22, 29), (16, 23), 900), "island": ((7, 10), (40, 45), (44, 49), 1300),
           "warm": ((6, 10), (22, 28), (34, 41), 800), "missed": ((2, 6), (38, 45), (18, 25), 500)}


def box(name: str) -> np.ndarray:
    """The designed lesion ``name`` as a bool mask."""
    (z0, z1), (y0, y1), (x0, x1), _ = LESIONS[name]
    mask = np.zeros(GEOMETRY.shape, bool)
    mask[z0:z1, y0:y1, x0:x1] = True
    return mask


def centre_mm(name: str) -> tuple[float, float, float]:
    """The LPS mm position of the voxel at the centre of lesion ``name`` (identity geometry)."""
    (z0, z1), (y0, y1), (x0, x1), _ = LESIONS[name]
    k, j, i = (z0 + z1 - 1) // 2, (y0 + y1 - 1) // 2, (x0 + x1 - 1) // 2
    o, s = GEOMETRY.origin, GEOMETRY.spacing
    return (o[0] + i * s[0], o[1] + j * s[1], o[2] + k * s[2])


def lesion_ids(lesions: list[dict]) -> dict[str, int]:
    """The lesion id the model gave each designed lesion ("hot", "island", "warm"), by the
    lesion whose centroid (``x_mm, y_mm, z_mm``) lies nearest the designed centre."""
    out = {}
    for name in ("hot", "island", "warm"):
        centre = np.array(centre_mm(name))
        out[name] = min(lesions, key=lambda l: np.linalg.norm(np.array([l["x_mm"], l["y_mm"], l["z_mm"]]) - centre))["id"]
    assert sorted(out.values()) == [1, 2, 3]
    return out


def phantom_ct(seed: int = 0) -> np.ndarray:
    """HU ``(slices, rows, cols)``: air, a soft-tissue body, a block of trabecular bone with the lesions."""
    rng = np.random.default_rng(seed)
    ct = np.full(GEOMETRY.shape, -1000.0)
    ct[:, 8:57, 6:59] = 40.0
    ct[:, 18:51, 12:53] = 250.0
    for name, (_, _, _, hu) in LESIONS.items():
        ct[box(name)] = hu
    return np.rint(ct + rng.normal(0, 5, ct.shape))


def write_study(folder: Path, *, patient_id: str = "REVIEW01", seed: int = 0) -> list[Path]:
    """The phantom as a DICOM CT series in ``folder`` (patient name :data:`PATIENT_NAME`)."""
    files = write_dicom_series(phantom_ct(seed), GEOMETRY, folder, patient_id=patient_id, localizer=False, seed=seed)
    for path in files:
        ds = pydicom.dcmread(path)
        ds.PatientName = PATIENT_NAME
        ds.save_as(path)
    return files


def _segment(volume: np.ndarray, z: np.ndarray, spacing) -> np.ndarray:
    """The network-free model: probability 0.6 + (HU - 600) / 1000 at 600 HU or more, else 0.1."""
    hu = np.asarray(volume[z], np.float32)
    return np.where(hu >= 600, np.clip(0.6 + (hu - 600) / 1000, 0, 1), 0.1).astype(np.float32)


def predict(images: Path, out: Path) -> Path:
    """``predict --images IMAGES --out OUT --dicom-seg --sr`` with the threshold model."""
    request = PredictRequest(cases="all", dicom_seg=True, sr=True, preview=False)
    net = Network(name="threshold600", fingerprint=FINGERPRINT, segment=_segment, crop=False)
    wing = WingRun(mode="segment", settings={"model": "threshold600"},
                   network=lambda plan: contextlib.nullcontext(net), outputs=request.outputs(threshold=0.5),
                   record=lambda: {"model": {"name": "threshold600", "fingerprint": FINGERPRINT}})
    result = predict_folder(request, wing, out, inputs=plan_request(request, None, images))
    assert not result.failures, result.failures
    return result.out


def node_spool(spool: Path, files: list[Path], destination: str, **config) -> None:
    """What ``serve`` does with a series received by C-STORE, without the network part: the files are
    spooled, then the node claims, predicts (:func:`predict`) and delivers once."""
    from analysis.node.deliver import Destination
    from analysis.node.server import Node, NodeConfig
    from analysis.node.spool import Spool

    store = Spool(spool)
    for path in files:
        ds = pydicom.dcmread(path)
        store.store(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID, path.read_bytes())
    node = Node(NodeConfig(spool=spool, destination=Destination.parse(destination), **config),
                lambda series_dir, out: predict(series_dir, out))
    node.run(once=True, poll=0.05)

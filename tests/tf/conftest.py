"""Fixtures for the TensorFlow tests: a tiny synthetic cohort written with analysis.imaging.io."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from analysis.cohort.layout import Cohort, write_dataset_json
from analysis.imaging.io import Geometry, write_array, write_mask


def make_cohort(root: Path, *, cases: int = 5, shape=(6, 40, 48), seed: int = 0,
                test: tuple[str, ...] = ("case_04",)) -> Path:
    """Write ``cases`` tiny CTs (air in the first rows, soft tissue 40 HU, a bone block 400 HU,
    lesions 900 HU on some slices) with masks, dataset.json and a splits.json (1 test case, 2 folds)."""
    rng = np.random.default_rng(seed)
    cohort = Cohort(root)
    geometry = Geometry(size=(shape[2], shape[1], shape[0]), spacing=(1.0, 1.0, 3.0),
                        origin=(0.0, 0.0, 0.0), direction=(1, 0, 0, 0, 1, 0, 0, 0, 1))
    ids = [f"case_{i:02d}" for i in range(cases)]
    for i, case in enumerate(ids):
        ct = np.full(shape, 40, np.int16) + rng.integers(-20, 20, shape).astype(np.int16)
        ct[:, :3, :] = -1000  # air in front of the patient: a CT's field of view holds some
        ct[:, 10:30, 12:36] = 400
        mask = np.zeros(shape, np.uint8)
        for z in range(1, shape[0], 2):  # lesions on odd slices
            r, c = 12 + (z + i) % 10, 14 + (2 * z + i) % 14
            mask[z, r:r + 5, c:c + 6] = 1
        ct[mask > 0] = 900
        write_array(ct, geometry, cohort.image_path(case))
        write_mask(mask, geometry, cohort.label_path(case))
    write_dataset_json(root, cases)
    rest = [c for c in ids if c not in test]
    splits = {"seed": 0, "test": list(test),
              "folds": [{"train": rest[1:], "val": rest[:1]}, {"train": rest[:-1], "val": rest[-1:]}]}
    (root / "splits.json").write_text(json.dumps(splits), encoding="utf-8")
    return root


@pytest.fixture
def cohort_dir(tmp_path: Path) -> Path:
    return make_cohort(tmp_path / "DATASET")


@pytest.fixture(scope="session")
def orthanc(tmp_path_factory):
    """One real Orthanc (tests/orthanc.py) for the session: the node's PACS and the viewer tests' archive."""
    from tests.orthanc import Orthanc, require_orthanc

    require_orthanc()
    server = Orthanc(tmp_path_factory.mktemp("orthanc"), {"bonemets": ("BONEMETS", "127.0.0.1", 1)})
    yield server
    server.stop()

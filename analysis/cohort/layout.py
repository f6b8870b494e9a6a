"""The cohort layout: the data contract shared by the Keras side, nnU-Net and the analysis.

Layout (nnU-Net v2 raw style; one case is one patient)::

    DATASET/dataset.json                 {"channel_names": {"0": "CT"},
                                          "labels": {"background": 0, "lesion": 1},
                                          "numTraining": N, "file_ending": ".nii.gz"}
    DATASET/imagesTr/<case>_0000.nii.gz  CT in Hounsfield units
    DATASET/labelsTr/<case>.nii.gz       binary lesion mask (0/1), same geometry as its image
    DATASET/bonesTr/<case>.nii.gz        optional bone map (codes in :data:`BONE_CODES`)
    DATASET/negativesTr/<case>.nii.gz    optional hard-negative map (0/1), same geometry as its image:
                                         regions a model called lesion and a reader rejected
                                         (``import-reviews``); they are background in the label and
                                         never overlap it (``train --hard-negative-fraction``)
    DATASET/reviews.json                 optional: the cases ``import-reviews`` made from reviewed
                                         studies (:data:`REVIEWS_FILE`)
    DATASET/splits.json                  {"seed": S, "test": [...], "folds": [{"train": [...], "val": [...]}, ...]}
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from analysis.errors import InputError
from analysis.imaging.io import atomic_write_json, read_json

FILE_ENDING = ".nii.gz"
IMAGE_SUFFIX = "_0000" + FILE_ENDING
CASE_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_\-]*$")

#: Bone map codes used in ``bonesTr`` (see the foundation issue).
BONE_CODES: dict[int, str] = {
    0: "none",
    1: "skull",
    2: "spine",
    3: "rib",
    4: "pelvis",
    5: "upper_extremity",
    6: "lower_extremity",
    7: "other",
}
MAX_BONE_CODE = max(BONE_CODES)

#: Hard-negative maps: ``negativesTr/<case>.nii.gz``.
NEGATIVES_DIR = "negativesTr"
#: The review set: ``{"cases": {case: {study_uid, series_uid, source, reader, ...}}}`` written by
#: ``import-reviews`` (:mod:`analysis.cohort.reviews`).
REVIEWS_FILE = "reviews.json"


def dataset_json_content(num_training: int) -> dict[str, Any]:
    """The ``dataset.json`` this project writes for ``num_training`` cases."""
    return {
        "channel_names": {"0": "CT"},
        "labels": {"background": 0, "lesion": 1},
        "numTraining": int(num_training),
        "file_ending": FILE_ENDING,
    }


@dataclass(frozen=True)
class Cohort:
    """A cohort folder in the project's layout. Paths only: nothing is read on creation."""

    root: Path

    def __init__(self, root: str | os.PathLike) -> None:
        object.__setattr__(self, "root", Path(root))

    # --- paths ---------------------------------------------------------------
    @property
    def images_dir(self) -> Path:
        return self.root / "imagesTr"

    @property
    def labels_dir(self) -> Path:
        return self.root / "labelsTr"

    @property
    def bones_dir(self) -> Path:
        return self.root / "bonesTr"

    @property
    def negatives_dir(self) -> Path:
        return self.root / NEGATIVES_DIR

    @property
    def reviews_path(self) -> Path:
        return self.root / REVIEWS_FILE

    @property
    def dataset_json_path(self) -> Path:
        return self.root / "dataset.json"

    @property
    def splits_path(self) -> Path:
        return self.root / "splits.json"

    def image_path(self, case: str) -> Path:
        return self.images_dir / f"{case}{IMAGE_SUFFIX}"

    def label_path(self, case: str) -> Path:
        return self.labels_dir / f"{case}{FILE_ENDING}"

    def bones_path(self, case: str) -> Path:
        return self.bones_dir / f"{case}{FILE_ENDING}"

    def has_bones(self, case: str) -> bool:
        return self.bones_path(case).is_file()

    def negatives_path(self, case: str) -> Path:
        return self.negatives_dir / f"{case}{FILE_ENDING}"

    def has_negatives(self, case: str) -> bool:
        return self.negatives_path(case).is_file()

    # --- contents ------------------------------------------------------------
    def require_exists(self) -> None:
        """Raise :class:`InputError` unless the folder is a usable cohort.

        Checks the folders, ``dataset.json`` (see :meth:`dataset_json`) and that every
        image has a label and every label an image, so that no command silently drops a
        case. Voxel-level checks are ``validate``'s (and each command's) job.
        """
        if not self.root.is_dir():
            raise InputError(f"{self.root}: dataset folder not found")
        if not self.images_dir.is_dir():
            raise InputError(f"{self.images_dir}: missing; expected CT images as imagesTr/<case>_0000.nii.gz")
        if not self.labels_dir.is_dir():
            raise InputError(f"{self.labels_dir}: missing; expected lesion masks as labelsTr/<case>{FILE_ENDING}")
        self.dataset_json()
        images, labels = set(self.image_cases()), set(self.label_cases())
        for case in sorted(images - labels):
            raise InputError(f"{self.image_path(case)}: image without a label; expected {self.label_path(case)}")
        for case in sorted(labels - images):
            raise InputError(f"{self.label_path(case)}: label without an image; expected {self.image_path(case)}")

    def image_cases(self) -> list[str]:
        """Case ids that have an image, sorted."""
        if not self.images_dir.is_dir():
            return []
        return sorted(p.name[: -len(IMAGE_SUFFIX)] for p in self.images_dir.iterdir()
                      if p.name.endswith(IMAGE_SUFFIX) and not p.name.startswith("."))

    def label_cases(self) -> list[str]:
        """Case ids that have a label, sorted."""
        if not self.labels_dir.is_dir():
            return []
        return sorted(p.name[: -len(FILE_ENDING)] for p in self.labels_dir.iterdir()
                      if p.name.endswith(FILE_ENDING) and not p.name.startswith("."))

    def cases(self) -> list[str]:
        """Case ids with both an image and a label, sorted (the usable cases)."""
        labels = set(self.label_cases())
        return [c for c in self.image_cases() if c in labels]

    def dataset_json(self) -> dict[str, Any]:
        """Read and check ``dataset.json``.

        Raises:
            InputError: missing, malformed, or without the fields this project needs.
        """
        data = read_json(self.dataset_json_path, what="dataset.json")
        problems = dataset_json_problems(data)
        if problems:
            raise InputError(f"{self.dataset_json_path}: {problems[0]}")
        return data

    def review_set(self) -> dict[str, dict[str, Any]]:
        """The cases ``import-reviews`` made from reviewed studies (``reviews.json``'s ``cases``:
        case id -> its study, reader and review record); empty when the cohort has none.

        Raises:
            InputError: ``reviews.json`` is not an object with a ``cases`` object.
        """
        if not self.reviews_path.is_file():
            return {}
        record = read_json(self.reviews_path, what="review set")
        cases = record.get("cases") if isinstance(record, dict) else None
        if not isinstance(cases, dict):
            raise InputError(f"{self.reviews_path}: expected an object with 'cases' (written by import-reviews)")
        return dict(cases)

    def splits(self) -> dict[str, Any] | None:
        """Read and check ``splits.json``; None when the cohort has none.

        Raises:
            InputError: malformed file or cases that are not in the cohort.
        """
        if not self.splits_path.exists():
            return None
        data = read_json(self.splits_path, what="splits.json")
        problems = splits_problems(data, self.cases())
        if problems:
            raise InputError(f"{self.splits_path}: {problems[0]}")
        return data

    def select(self, spec: str = "test") -> list[str]:
        """Resolve a ``--cases`` value: ``test``, ``all``, ``train`` or ``ID,ID,...``.

        ``test`` falls back to every case when the cohort has no ``splits.json``.

        Raises:
            InputError: unknown case ids or an empty selection.
        """
        available = self.cases()
        if spec == "all":
            chosen = available
        elif spec in ("test", "train"):
            splits = self.splits()
            if splits is None:
                chosen = available
            elif spec == "test":
                chosen = sorted(splits["test"])
            else:
                test = set(splits["test"])
                chosen = [c for c in available if c not in test]
        else:
            chosen = [c.strip() for c in spec.split(",") if c.strip()]
            unknown = [c for c in chosen if c not in available]
            if unknown:
                raise InputError(f"--cases: unknown case(s) {', '.join(unknown)} in {self.root}; "
                                 f"expected ids from imagesTr/labelsTr, 'test' or 'all'")
        if not chosen:
            raise InputError(f"{self.root}: no cases selected by --cases {spec!r}")
        return chosen


def write_dataset_json(root: str | os.PathLike, num_training: int, *, description: str | None = None) -> Path:
    """Write the cohort's ``dataset.json`` atomically.

    Extra keys of an existing file (a ``name`` or ``description``, say) are kept; the
    required fields are (re)set. A ``description`` mentioning "synthetic" or "phantom"
    makes reports say the data are not patients'.
    """
    path = Path(root) / "dataset.json"
    content: dict[str, Any] = {}
    if path.is_file():
        try:
            old = read_json(path, what="dataset.json")
            content = old if isinstance(old, dict) else {}
        except InputError:
            content = {}
    content.update(dataset_json_content(num_training))
    if description is not None:
        content["description"] = description
    return atomic_write_json(path, content)


def dataset_json_problems(data: Any) -> list[str]:
    """Problems with a parsed ``dataset.json`` (empty list when it is usable)."""
    if not isinstance(data, dict):
        return [f"expected a JSON object, found {type(data).__name__}"]
    problems = []
    channels = data.get("channel_names", data.get("modality"))
    if not isinstance(channels, dict) or len(channels) != 1:
        problems.append(f"'channel_names' must map one channel, e.g. {{\"0\": \"CT\"}}; found {channels!r}")
    labels = data.get("labels")
    if not isinstance(labels, dict) or labels.get("background") != 0 or labels.get("lesion") != 1 or len(labels) != 2:
        problems.append(f"'labels' must be {{\"background\": 0, \"lesion\": 1}}; found {labels!r}")
    ending = data.get("file_ending")
    if ending != FILE_ENDING:
        problems.append(f"'file_ending' must be {FILE_ENDING!r}; found {ending!r}")
    n = data.get("numTraining")
    if not isinstance(n, int) or isinstance(n, bool) or n < 0:
        problems.append(f"'numTraining' must be a non-negative integer; found {n!r}")
    return problems


def splits_problems(data: Any, known_cases: Sequence[str]) -> list[str]:
    """Problems with a parsed ``splits.json`` for a cohort holding ``known_cases``."""
    if not isinstance(data, dict):
        return [f"expected a JSON object with 'test' and 'folds', found {type(data).__name__}"]
    test = data.get("test")
    folds = data.get("folds")
    if not isinstance(test, list) or not all(isinstance(c, str) for c in test):
        return [f"'test' must be a list of case ids; found {test!r}"[:200]]
    if not isinstance(folds, list) or not folds:
        return [f"'folds' must be a non-empty list of {{'train': [...], 'val': [...]}}; found {folds!r}"[:200]]
    problems = []
    known = set(known_cases)
    unknown = sorted({c for c in test if c not in known})
    test_set = set(test)
    for k, fold in enumerate(folds):
        if not isinstance(fold, dict) or not isinstance(fold.get("train"), list) or not isinstance(fold.get("val"), list):
            problems.append(f"fold {k} must be {{'train': [...], 'val': [...]}}")
            continue
        tr, va = set(fold["train"]), set(fold["val"])
        unknown += sorted((tr | va) - known - set(unknown))
        if tr & va:
            problems.append(f"fold {k}: cases in both train and val: {', '.join(sorted(tr & va))}")
        if (tr | va) & test_set:
            problems.append(f"fold {k}: test cases used for training/validation: {', '.join(sorted((tr | va) & test_set))}")
    if unknown:
        problems.insert(0, f"names unknown case(s) {', '.join(sorted(set(unknown)))}; "
                           f"expected ids present in imagesTr and labelsTr")
    return problems


def fold_cases(splits: dict[str, Any] | None, fold: int, available: Sequence[str]) -> tuple[list[str], list[str]]:
    """Training and validation cases of ``fold``; without splits, every case trains and validates.

    Raises:
        InputError: ``fold`` is out of range.
    """
    if splits is None:
        return list(available), list(available)
    folds = splits["folds"]
    if not 0 <= fold < len(folds):
        raise InputError(f"--fold {fold}: splits.json has folds 0..{len(folds) - 1}")
    return sorted(folds[fold]["train"]), sorted(folds[fold]["val"])


def check_case_id(case: str) -> str:
    """Validate a user-supplied case id (letters, digits, '_' and '-')."""
    if not CASE_ID_RE.match(case) or case.endswith("_0000"):
        raise InputError(f"--case {case!r}: expected letters, digits, '_' or '-' (not ending in _0000)")
    return case

"""``followup --sr``: the comparison as DICOM objects on the baseline series.

- ``followup_seg.dcm``: a DICOM SEG (:func:`analysis.imaging.dicom_seg.write_dicom_seg`) of the
  baseline series with one segment per tracked lesion that has voxels in the baseline frame
  (``status.nii.gz``'s extents: the baseline lesion, else the registered follow-up lesion),
  segment label "bone metastasis K" and TrackingID "lesion K", K the ``lesion`` of lesions.csv;
  segment numbers run 1..M in lesion order (a lesion without voxels in the baseline frame, e.g. a
  new lesion outside its field of view, has no segment);
- ``followup_sr.dcm``: the TID 1500 report of lesions.csv and summary.csv referencing those
  segments (:func:`analysis.monitoring.followup_sr.write_followup_report`).

Both carry UIDs derived from the baseline SeriesInstanceUID and the follow-up's sha256, so
writing the same comparison again gives the same objects (a PACS replaces, not duplicates).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from analysis import __version__
from analysis.imaging.dicom import DicomSeries
from analysis.imaging.dicom_seg import write_dicom_seg
from analysis.lesions import cross_sections, lesion_table
from analysis.monitoring.followup_sr import write_followup_report

__all__ = ["SEG_NAME", "SR_NAME", "write_followup_dicom"]

SEG_NAME = "followup_seg.dcm"
SR_NAME = "followup_sr.dcm"
ALGORITHM = "bonemets followup"


def segment_labels(numbers: np.ndarray) -> tuple[np.ndarray, list[int]]:
    """Tracked lesion numbers renumbered as SEG segments 1..M.

    Args:
        numbers: tracked lesion number (``lesion`` of lesions.csv) per baseline voxel, 0 elsewhere,
            ``(slices, rows, cols)``.

    Returns:
        ``(labels, lesion_ids)``: uint16 segment numbers of the same shape, and the lesion of
        each segment (segment i is lesion ``lesion_ids[i - 1]``).
    """
    present = [int(k) for k in np.unique(numbers) if k > 0]
    lut = np.zeros(int(numbers.max(initial=0)) + 1, np.uint16)
    lut[present] = np.arange(1, len(present) + 1)
    return lut[numbers], present


def write_followup_dicom(out: Path, series: DicomSeries, numbers: np.ndarray, *, rows: Sequence[Mapping[str, Any]],
                         summary: Mapping[str, Any], followup_sha256: str, followup_id: str) -> dict[str, Any]:
    """Write :data:`SEG_NAME` and :data:`SR_NAME` into ``out`` (module docstring).

    Args:
        out: the folder (``followup``'s staging folder).
        series: the baseline DICOM series; ``numbers`` is on its grid.
        numbers: tracked lesion number per baseline voxel, ``(slices, rows, cols)``.
        rows, summary: lesions.csv's rows and summary.csv's row.
        followup_sha256: the follow-up input's sha256 (file or series folder): the UIDs derive from it.
        followup_id: the report's time point identifier of the follow-up (its SeriesInstanceUID, or
            ``sha256:...`` for an image file).

    Returns:
        ``{"seg": write_dicom_seg's record, "sr": write_followup_report's record}`` with paths
        relative to ``out``.

    Raises:
        InputError: from either writer (nothing of that file is left behind).
    """
    seed = f"{series.series_uid}|{followup_sha256}"
    labels, lesion_ids = segment_labels(numbers)
    seg = write_dicom_seg((labels > 0).astype(np.uint8), series, out / SEG_NAME, model_name=ALGORITHM,
                          model_version=__version__, series_number=9910,
                          series_description="bonemets follow-up lesions", labels=labels, uid_seed=seed,
                          lesion_ids=lesion_ids)
    # each segment drawn on its largest cross-section (the baseline series' slices)
    table = lesion_table(labels, len(lesion_ids), spacing_mm=(1.0, 1.0, 1.0))
    sections = cross_sections(labels, table, pixel_spacing_mm=series.pixel_spacing)
    sr = write_followup_report(series, out / SR_NAME, lesions=rows, summary=summary,
                               seg_path=seg["path"] if seg["written"] else None,
                               anchors=dict(zip(lesion_ids, sections)),
                               followup_id=followup_id, model_name=ALGORITHM,
                               model_version=__version__, uid_seed=seed)
    if seg["written"]:
        seg["path"] = SEG_NAME
    sr["path"] = SR_NAME
    return {"seg": seg, "sr": sr}

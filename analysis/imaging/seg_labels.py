"""A DICOM-SEG as the lesion label of a CT series: references checked, segment chosen, read with highdicom.

A SEG written by OHIF, 3D Slicer, MONAI Label or highdicom (``write_dicom_seg`` of
:mod:`analysis.imaging.dicom_seg` among them) holds its frames with references to the source
images they were derived from. It is accepted as the label of a series only when it is in the
series' Frame of Reference, references the series (ReferencedSeriesSequence) and only
instances of it, and has the series' pixel matrix; its frames are then placed by those
references (``highdicom.seg.Segmentation.get_pixels_by_source_instance``, or
``get_pixels_by_source_frame`` for an Enhanced CT), so slice ``k`` of the result is the
mask of the series' slice ``k``. Instances without a SEG frame are empty (highdicom checks it).
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

import highdicom as hd
import numpy as np

from analysis.errors import InputError
from analysis.imaging.dicom import DicomSeries

log = logging.getLogger(__name__)

__all__ = ["seg_pixels", "read_seg_label", "segment_numbers"]


def seg_pixels(seg: hd.seg.Segmentation, series: DicomSeries, segments: list[int] | None = None) -> np.ndarray:
    """The SEG's segments (merged by union) on the series' slices, by source-image reference.

    highdicom combines the segments into one label volume as it reads the frames
    (``combine_segments``, overlaps allowed: a voxel in several segments keeps one of them),
    so memory is one volume whatever the number of segments (one volume per segment took
    6.4 GB for a 389-segment SEG).

    Args:
        seg: the segmentation, read with ``highdicom.seg.segread``.
        series: its source series.
        segments: segment numbers to merge; None: every segment.

    Returns:
        uint8 0/1 ``(slices, rows, cols)``, slice ``k`` the mask of ``series`` slice ``k``.
    """
    common = {"segment_numbers": segments, "combine_segments": True, "relabel": True, "skip_overlap_checks": True,
              "assert_missing_frames_are_empty": True}
    if series.multiframe:
        pixels = seg.get_pixels_by_source_frame(source_sop_instance_uid=series.sop_instance_uids[0],
                                                source_frame_numbers=series.frame_numbers, **common)
    else:
        pixels = seg.get_pixels_by_source_instance(source_sop_instance_uids=series.sop_instance_uids, **common)
    return (np.asarray(pixels) != 0).astype(np.uint8)


def _segments(seg: hd.seg.Segmentation) -> list[tuple[int, str]]:
    return [(int(s.SegmentNumber), str(s.get("SegmentLabel", ""))) for s in seg.SegmentSequence]


#: Segments a message lists at most (a SEG of every vertebra and rib has hundreds).
LISTED = 10


def _listing(segments: list[tuple[int, str]]) -> str:
    """``1 'a', 2 'b'``: at most :data:`LISTED` segments, then how many more.

    >>> _listing([(i, f"s{i}") for i in range(1, 13)])
    "1 's1', 2 's2', 3 's3', 4 's4', 5 's5', 6 's6', 7 's7', 8 's8', 9 's9', 10 's10' and 2 more"
    """
    shown = ", ".join(f"{n} '{label}'" for n, label in segments[:LISTED]) or "none"
    return shown + (f" and {len(segments) - LISTED} more" if len(segments) > LISTED else "")


def segment_numbers(path: str | os.PathLike, segments: list[tuple[int, str]], choice: str | None) -> list[int]:
    """The segment numbers a ``--segment`` choice names.

    Args:
        path: the SEG (named in messages).
        segments: ``(SegmentNumber, SegmentLabel)`` of every segment of the file.
        choice: None (the only segment), ``"all"`` (every segment, merged), a segment
            number, or a segment label (exact).

    Raises:
        InputError: no such segment, or no choice with several segments; the message lists
            the segments there.

    Examples:
        >>> segment_numbers("s.dcm", [(1, "lesion"), (2, "bone")], "bone")
        [2]
        >>> segment_numbers("s.dcm", [(1, "lesion"), (2, "bone")], "all")
        [1, 2]
    """
    if choice is None:
        if len(segments) != 1:
            raise InputError(f"{path}: {len(segments)} segments ({_listing(segments)}); choose one with --segment "
                             f"NUMBER|LABEL, or --segment all to merge them")
        return [segments[0][0]]
    if choice == "all":
        return [n for n, _ in segments]
    hits = [n for n, label in segments if (choice.isdigit() and n == int(choice)) or label == choice]
    if not hits:
        raise InputError(f"{path}: no segment {choice!r}; segments there: {_listing(segments)}")
    return hits[:1]


def _check_references(path: Path, seg: hd.seg.Segmentation, series: DicomSeries) -> None:
    series_refs = [str(s.SeriesInstanceUID) for s in seg.get("ReferencedSeriesSequence", [])]
    instances = {str(i.ReferencedSOPInstanceUID) for s in seg.get("ReferencedSeriesSequence", [])
                 for i in s.get("ReferencedInstanceSequence", [])}
    seg_for = str(seg.get("FrameOfReferenceUID", "")) or "(none)"
    ours = (f"the imported series {series.series_uid} (frame of reference "
            f"{series.frame_of_reference_uid or 'none'}) in {series.folder}")
    if seg_for != series.frame_of_reference_uid or series.series_uid not in series_refs:
        raise InputError(f"{path}: references series {', '.join(series_refs) or '(none)'} in frame of reference "
                         f"{seg_for}; expected {ours}")
    stray = sorted(instances - set(series.sop_instance_uids))
    if stray:
        more = f" (and {len(stray) - 1} more)" if len(stray) > 1 else ""
        raise InputError(f"{path}: references instance {stray[0]}{more}, not an instance of {ours}")
    if (int(seg.Rows), int(seg.Columns)) != (series.rows, series.columns):
        raise InputError(f"{path}: frames of {int(seg.Rows)} x {int(seg.Columns)} pixels; expected the series' "
                         f"{series.rows} x {series.columns}")


def read_seg_label(path: str | os.PathLike, series: DicomSeries, segment: str | None = None) -> np.ndarray:
    """A DICOM-SEG's chosen segment(s) as a lesion mask of ``series``.

    Args:
        path: the SEG file.
        series: the imported series.
        segment: see :func:`segment_numbers` (None: the only segment; ``"all"`` merges).

    Returns:
        uint8 0/1 ``(slices, rows, cols)`` in the order of :func:`analysis.imaging.dicom.read_series`.

    Raises:
        InputError: not a readable SEG; a FRACTIONAL SEG (a probability map is never
            thresholded silently); another frame of reference, series or pixel matrix;
            a missing segment; frames without source-image references; an empty selection.
    """
    path = Path(path)
    try:
        seg = hd.seg.segread(path)
    except Exception as exc:  # pydicom/highdicom raise many kinds for a damaged or foreign file
        raise InputError(f"{path}: not a readable DICOM-SEG ({type(exc).__name__}: {str(exc)[:120]})") from None
    if str(seg.SegmentationType) != "BINARY":
        raise InputError(f"{path}: SegmentationType {seg.SegmentationType}; expected BINARY "
                         f"(a fractional/probability SEG is not thresholded silently)")
    _check_references(path, seg, series)
    segments = _segments(seg)
    numbers = segment_numbers(path, segments, segment)
    try:
        mask = seg_pixels(seg, series, numbers)
    except (ValueError, KeyError, RuntimeError) as exc:
        raise InputError(f"{path}: its frames cannot be placed on series {series.series_uid} by their source-image "
                         f"references ({str(exc)[:160]})") from None
    if not mask.any():
        chosen = _listing([s for s in segments if s[0] in numbers])
        raise InputError(f"{path}: segment(s) {chosen} hold no voxel; segments there: {_listing(segments)}")
    log.info("%s: segment(s) %s, %d voxels", path, numbers, int(mask.sum()))
    return mask

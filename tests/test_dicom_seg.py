"""analysis.imaging.dicom_seg: DICOM SEG of a mask, read back voxel for voxel, centroids in patient mm."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from pydicom.uid import generate_uid

import analysis.imaging.dicom_seg as dicom_seg
from analysis.errors import InputError
from analysis.imaging.dicom import DicomSeries, read_dicom
from analysis.imaging.dicom_seg import write_dicom_seg
from analysis.imaging.io import Geometry, read_array, write_mask
from analysis.lesions import lesion_instances, seg_lesion_centroids
from tests.test_dicom import FOR, SHAPE, STUDY, hu_volume, write_ct, write_enhanced_ct, write_localizer


def lesion_mask(shape=SHAPE) -> np.ndarray:
    """Three lesions: a block over slices 1-2, one voxel on slice 4, a diagonal pair (26-connected) on 4-5."""
    m = np.zeros(shape, np.uint8)
    m[1:3, 2:5, 3:7] = 1
    m[4, 12, 2] = 1
    m[4, 8, 15] = m[5, 9, 16] = 1
    return m


def nifti_centroids(mask: np.ndarray, image: sitk.Image, tmp_path: Path) -> list[np.ndarray]:
    """Lesion centroids from the mask written as NIfTI in the image's geometry (SimpleITK)."""
    path = write_mask(mask, Geometry.of(image), tmp_path / "mask.nii.gz")
    arr, geom = read_array(path)
    ref = sitk.ReadImage(str(path))
    labels, n = lesion_instances(arr, connectivity=26)
    out = []
    for lesion in range(1, n + 1):
        k, i, j = np.nonzero(labels == lesion)
        out.append(np.array(ref.TransformContinuousIndexToPhysicalPoint((float(j.mean()), float(i.mean()), float(k.mean())))))
    return out


def _layout_standard(folder: Path) -> None:
    write_ct(folder, hu_volume())


def _layout_columns_anterior(folder: Path) -> None:
    write_ct(folder, hu_volume(), iop=(1, 0, 0, 0, -1, 0))


def _layout_shuffled(folder: Path) -> None:
    write_ct(folder, hu_volume(), random_names=True, shuffle_numbers=True, seed=3)


def _layout_crowded(folder: Path) -> None:
    write_ct(folder, hu_volume(), iop=(1, 0, 0, 0, -1, 0), random_names=True, shuffle_numbers=True, description="main")
    write_ct(folder, hu_volume((4, 16, 20), seed=5), description="small", series_number=7, origin=(3.0, 2.0, 0.0))
    uid = generate_uid()
    write_localizer(folder, (1, 0, 0, 0, 0, -1), series_uid=uid, name="scout_ap.dcm")
    write_localizer(folder, (0, 1, 0, 0, 0, -1), series_uid=uid, name="scout_lat.dcm")


def _layout_anonymous(folder: Path) -> None:
    write_ct(folder, hu_volume(), anonymous=True, random_names=True)


LAYOUTS = {"standard": _layout_standard, "columns-anterior": _layout_columns_anterior, "shuffled": _layout_shuffled,
           "localizers-and-second-series": _layout_crowded, "anonymised": _layout_anonymous}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_seg_reads_back_equal_and_centroids_match(tmp_path, layout):
    LAYOUTS[layout](tmp_path / "ct")
    image, series = read_dicom(tmp_path / "ct")
    mask = lesion_mask()
    rec = write_dicom_seg(mask, series, tmp_path / "out" / "seg.dcm", model_name="unet", model_version="0123abcd")
    assert rec["written"] and rec["lesion_voxels"] == int(mask.sum()) and rec["n_frames"] == 4  # empty frames omitted
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["seg.dcm"]
    assert json.loads(json.dumps(rec)) == rec
    import highdicom as hd

    seg = hd.seg.segread(rec["path"])
    back = seg.get_pixels_by_source_instance(source_sop_instance_uids=series.sop_instance_uids,
                                             combine_segments=True, assert_missing_frames_are_empty=True)
    assert np.array_equal(back, mask)
    # each SEG frame sits where its source slice is, and that slice holds the mask's slice in the CT
    ds = pydicom.dcmread(rec["path"])
    for frame in ds.PerFrameFunctionalGroupsSequence:
        src_uid = frame.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        k = series.sop_instance_uids.index(src_uid)
        src = pydicom.dcmread(series.files[k])
        assert [float(v) for v in frame.PlanePositionSequence[0].ImagePositionPatient] == \
            pytest.approx([float(v) for v in src.ImagePositionPatient])
        assert np.array_equal(src.pixel_array.astype(np.int32) - 1024, sitk.GetArrayFromImage(image)[k])
    seg_c = seg_lesion_centroids(rec["path"])
    ref_c = nifti_centroids(mask, image, tmp_path)
    assert len(seg_c) == len(ref_c) == 3
    half_voxel = 0.5 * min(image.GetSpacing())
    for c in ref_c:
        assert min(np.linalg.norm(np.array(s) - c) for s in seg_c) < half_voxel


def test_seg_mandatory_attributes(tmp_path):
    _layout_crowded(tmp_path / "ct")
    _, series = read_dicom(tmp_path / "ct")
    rec = write_dicom_seg(lesion_mask(), series, tmp_path / "seg.dcm", model_name="resattunet", model_version="feedbeef")
    ds = pydicom.dcmread(rec["path"])
    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.4" and ds.Modality == "SEG"
    assert ds.SegmentationType == "BINARY" and ds.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.1"
    assert ds.StudyInstanceUID == STUDY and ds.FrameOfReferenceUID == FOR and ds.PatientID == "PT01"
    assert ds.PatientName == "Test^Patient"
    assert ds.SeriesInstanceUID != series.series_uid and ds.SOPInstanceUID == rec["sop_instance_uid"]
    (segment,) = ds.SegmentSequence
    assert segment.SegmentLabel == "bone metastasis" and segment.SegmentAlgorithmType == "AUTOMATIC"
    cat, typ = segment.SegmentedPropertyCategoryCodeSequence[0], segment.SegmentedPropertyTypeCodeSequence[0]
    assert (cat.CodeValue, cat.CodingSchemeDesignator) == ("49755003", "SCT")
    assert (typ.CodeValue, typ.CodingSchemeDesignator) == ("14799000", "SCT")
    alg = segment.SegmentationAlgorithmIdentificationSequence[0]
    assert alg.AlgorithmName == "resattunet" and alg.AlgorithmVersion == "feedbeef"
    fam = alg.AlgorithmFamilyCodeSequence[0]
    assert (fam.CodeValue, fam.CodingSchemeDesignator, fam.CodeMeaning) == ("123110", "DCM", "Artificial Intelligence")
    (ref_series,) = ds.ReferencedSeriesSequence
    assert ref_series.SeriesInstanceUID == series.series_uid
    assert {i.ReferencedSOPInstanceUID for i in ref_series.ReferencedInstanceSequence} == set(series.sop_instance_uids)
    shared = ds.SharedFunctionalGroupsSequence[0]
    assert [float(v) for v in shared.PlaneOrientationSequence[0].ImageOrientationPatient] == [1, 0, 0, 0, -1, 0]
    assert [float(v) for v in shared.PixelMeasuresSequence[0].PixelSpacing] == [0.9, 0.8]
    for frame in ds.PerFrameFunctionalGroupsSequence:
        src = frame.DerivationImageSequence[0].SourceImageSequence[0]
        assert src.ReferencedSOPInstanceUID in series.sop_instance_uids
        ident = frame if "SegmentIdentificationSequence" in frame else shared  # one segment: may be shared
        assert ident.SegmentIdentificationSequence[0].ReferencedSegmentNumber == 1


def test_empty_mask_writes_nothing(tmp_path):
    _layout_standard(tmp_path / "ct")
    _, series = read_dicom(tmp_path / "ct")
    rec = write_dicom_seg(np.zeros(SHAPE, np.uint8), series, tmp_path / "out" / "seg.dcm", model_name="m", model_version="v")
    assert rec == {"written": False, "path": None, "reason": "no lesion voxels", "lesion_voxels": 0,
                   "referenced_series_uid": series.series_uid}
    assert not (tmp_path / "out").exists()


def test_file_mode_honours_umask(tmp_path):
    _layout_standard(tmp_path / "ct")
    _, series = read_dicom(tmp_path / "ct")
    old = os.umask(0o027)
    try:
        rec = write_dicom_seg(lesion_mask(), series, tmp_path / "seg.dcm", model_name="m", model_version="v")
    finally:
        os.umask(old)
    assert oct(os.stat(rec["path"]).st_mode & 0o777) == oct(0o640)


def test_a_seg_that_reads_back_different_is_refused_and_removed(tmp_path, monkeypatch):
    _layout_standard(tmp_path / "ct")
    _, series = read_dicom(tmp_path / "ct")
    (tmp_path / "out").mkdir()
    real = dicom_seg._read_back
    monkeypatch.setattr(dicom_seg, "_read_back", lambda path, s: real(path, s)[::-1])
    with pytest.raises(InputError, match=r"seg\.dcm: the SEG read back differs from the mask \(\d+ voxels"):
        write_dicom_seg(lesion_mask(), series, tmp_path / "out" / "seg.dcm", model_name="m", model_version="v")
    assert list((tmp_path / "out").iterdir()) == []


def test_bad_masks_are_refused(tmp_path):
    _layout_standard(tmp_path / "ct")
    _, series = read_dicom(tmp_path / "ct")
    with pytest.raises(InputError, match=r"shape \(6, 16, 21\) differs from the series' \(slices, rows, cols\) \(6, 16, 20\)"):
        write_dicom_seg(np.zeros((6, 16, 21), np.uint8), series, tmp_path / "s.dcm", model_name="m", model_version="v")
    with pytest.raises(InputError, match=r"values \[0, 2\]; expected only 0 and 1"):
        write_dicom_seg(lesion_mask() * 2, series, tmp_path / "s.dcm", model_name="m", model_version="v")
    assert not (tmp_path / "s.dcm").exists()


def test_seg_of_an_enhanced_ct(tmp_path):
    hu = hu_volume()
    write_enhanced_ct(tmp_path / "mf" / "enh.dcm", hu, iop=(1, 0, 0, 0, -1, 0), frame_order=[3, 0, 5, 1, 4, 2])
    image, series = read_dicom(tmp_path / "mf")
    mask = lesion_mask()
    rec = write_dicom_seg(mask, series, tmp_path / "seg.dcm", model_name="m", model_version="v")
    import highdicom as hd

    back = hd.seg.segread(rec["path"]).get_pixels_by_source_frame(
        source_sop_instance_uid=series.sop_instance_uids[0], source_frame_numbers=series.frame_numbers,
        combine_segments=True, assert_missing_frames_are_empty=True)
    assert np.array_equal(back, mask)
    ref_c = nifti_centroids(mask, image, tmp_path)
    seg_c = seg_lesion_centroids(rec["path"])
    assert len(seg_c) == 3
    for c in ref_c:
        assert min(np.linalg.norm(np.array(s) - c) for s in seg_c) < 0.4


def test_changed_source_files_are_refused(tmp_path):
    _layout_standard(tmp_path / "ct")
    _, series = read_dicom(tmp_path / "ct")
    ds = pydicom.dcmread(series.files[2])
    ds.ImagePositionPatient = [0, 0, 999]
    ds.save_as(series.files[2])
    with pytest.raises(InputError, match=r"is not a free slice position of series"):
        write_dicom_seg(lesion_mask(), series, tmp_path / "seg.dcm", model_name="m", model_version="v")
    assert isinstance(series, DicomSeries) and not (tmp_path / "seg.dcm").exists()

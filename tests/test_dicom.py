"""analysis.imaging.dicom: series choice, localizers, multi-frame CT, refusals, on tiny synthetic DICOM.

The writers here (``write_ct``, ``write_localizer``, ``write_enhanced_ct``) are shared with
tests/test_dicom_seg.py and tests/test_inputs.py.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from click.testing import CliRunner
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import CTImageStorage, EnhancedCTImageStorage, ExplicitVRLittleEndian, generate_uid

from analysis.errors import InputError
from analysis.imaging.dicom import SLICE_GAP_RTOL, find_series, list_series, read_dicom, read_series, series_folders
from analysis.imaging.io import read_array
from cli import main

STUDY = "1.2.826.0.1.3680043.8.498.1001"
FOR = "1.2.826.0.1.3680043.8.498.1002"
SHAPE = (6, 16, 20)


def _base(sop_class: str, *, series_uid: str, patient: bool = True, description: str = "Abdomen 1.0",
          series_number: int = 2, modality: str = "CT") -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.Modality = modality
    ds.StudyInstanceUID = STUDY
    ds.SeriesInstanceUID = series_uid
    ds.FrameOfReferenceUID = FOR
    ds.SeriesNumber = series_number
    ds.SeriesDescription = description
    if patient:
        ds.PatientName = "Test^Patient"
        ds.PatientID = "PT01"
        ds.PatientBirthDate = "19500101"
        ds.PatientSex = "F"
        ds.StudyDate = "20260101"
        ds.StudyTime = "120000"
        ds.AccessionNumber = "ACC1"
        ds.StudyID = "1"
        ds.ReferringPhysicianName = ""
    ds.Manufacturer = "synthetic"
    return ds


def _pixels(ds: Dataset, stored: np.ndarray) -> None:
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = stored.shape[-2:]
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.PixelData = np.ascontiguousarray(stored.astype(np.uint16)).tobytes()


def normal_of(iop) -> np.ndarray:
    return np.cross(np.asarray(iop[:3], float), np.asarray(iop[3:], float))


def write_ct(folder: Path, hu: np.ndarray, *, spacing=(0.9, 0.8), step: float = 3.0, origin=(-10.0, 5.0, 2.5),
             iop=(1, 0, 0, 0, 1, 0), series_uid: str | None = None, random_names: bool = False,
             shuffle_numbers: bool = False, anonymous: bool = False, skip=(), offsets: dict | None = None,
             tilt: float | None = None, shear: float = 0.0, description: str = "Abdomen 1.0",
             series_number: int = 2, thickness: float | None = None, seed: int = 0) -> list[Path]:
    """A CT Image Storage series: ``hu[k]`` is slice k at ``origin + k * step * normal``.

    Stored values are HU + 1024 with RescaleIntercept -1024. ``offsets`` moves slice k by extra
    mm along the normal; ``shear`` moves slice k by ``k * shear`` mm along the column cosine
    (a tilted stack); ``tilt`` sets GantryDetectorTilt.
    """
    folder.mkdir(parents=True, exist_ok=True)
    series_uid = series_uid or generate_uid()
    rng = random.Random(seed)
    numbers = list(range(1, hu.shape[0] + 1))
    if shuffle_numbers:
        rng.shuffle(numbers)
    n = normal_of(iop)
    col = np.asarray(iop[3:], float)
    paths = []
    for k in range(hu.shape[0]):
        if k in skip:
            continue
        ds = _base(CTImageStorage, series_uid=series_uid, patient=not anonymous, description=description,
                   series_number=series_number)
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.InstanceNumber = numbers[k]
        pos = np.asarray(origin, float) + (k * step + (offsets or {}).get(k, 0.0)) * n + k * shear * col
        ds.ImagePositionPatient = [f"{v:.4f}" for v in pos]
        ds.ImageOrientationPatient = [f"{v:g}" for v in iop]
        ds.PixelSpacing = [f"{spacing[0]:g}", f"{spacing[1]:g}"]
        if not anonymous:
            ds.SliceThickness = f"{thickness if thickness is not None else step:g}"
        if tilt is not None:
            ds.GantryDetectorTilt = f"{tilt:g}"
        ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = "-1024", "1", "HU"
        _pixels(ds, hu[k].astype(np.int32) + 1024)
        name = f"{rng.getrandbits(48):012x}" if random_names else f"s{series_number}_{k:03d}.dcm"
        path = folder / name
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def write_localizer(folder: Path, iop, *, series_uid: str, name: str, shape=(16, 24)) -> Path:
    """One localizer (scout) image, ImageType ORIGINAL\\PRIMARY\\LOCALIZER."""
    folder.mkdir(parents=True, exist_ok=True)
    ds = _base(CTImageStorage, series_uid=series_uid, description="Topogram", series_number=1)
    ds.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
    ds.InstanceNumber = 1
    ds.ImagePositionPatient = ["-100", "-100", "200"]
    ds.ImageOrientationPatient = [f"{v:g}" for v in iop]
    ds.PixelSpacing = ["2", "2"]
    ds.RescaleIntercept, ds.RescaleSlope = "-1024", "1"
    _pixels(ds, np.full(shape, 1024))
    path = folder / name
    ds.save_as(path, enforce_file_format=True)
    return path


def write_enhanced_ct(path: Path, hu: np.ndarray, *, spacing=(0.9, 0.8), step: float = 3.0, origin=(-10.0, 5.0, 2.5),
                      iop=(1, 0, 0, 0, 1, 0), frame_order=None, slope: float = 1.0) -> Path:
    """One Enhanced CT Image Storage object; frame ``i`` holds slice ``frame_order[i]`` of ``hu``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    n_frames = hu.shape[0]
    order = list(frame_order) if frame_order is not None else list(range(n_frames))
    ds = _base(EnhancedCTImageStorage, series_uid=generate_uid(), description="Enhanced")
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL", "NONE"]
    ds.InstanceNumber = 1
    ds.NumberOfFrames = n_frames
    shared = Dataset()
    pm = Dataset()
    pm.PixelSpacing = [f"{spacing[0]:g}", f"{spacing[1]:g}"]
    pm.SliceThickness = f"{step:g}"
    po = Dataset()
    po.ImageOrientationPatient = [f"{v:g}" for v in iop]
    pv = Dataset()
    pv.RescaleIntercept, pv.RescaleSlope, pv.RescaleType = "-1024", f"{slope:g}", "HU"
    shared.PixelMeasuresSequence = Sequence([pm])
    shared.PlaneOrientationSequence = Sequence([po])
    shared.PixelValueTransformationSequence = Sequence([pv])
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    n = normal_of(iop)
    frames = []
    for i in range(n_frames):
        item = Dataset()
        pp = Dataset()
        pp.ImagePositionPatient = [f"{v:.4f}" for v in np.asarray(origin, float) + order[i] * step * n]
        item.PlanePositionSequence = Sequence([pp])
        fc = Dataset()
        fc.InStackPositionNumber = order[i] + 1
        item.FrameContentSequence = Sequence([fc])
        frames.append(item)
    ds.PerFrameFunctionalGroupsSequence = Sequence(frames)
    stored = np.stack([(hu[order[i]] + 1024) / slope for i in range(n_frames)])
    _pixels(ds, np.round(stored))
    ds.save_as(path, enforce_file_format=True)
    return path


def hu_volume(shape=SHAPE, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(-1000, 1500, size=shape).astype(np.int16)


def physical(image: sitk.Image, index_xyz) -> np.ndarray:
    return np.array(image.TransformContinuousIndexToPhysicalPoint([float(v) for v in index_xyz]))


# --- reading ---------------------------------------------------------------------------------


@pytest.mark.parametrize("iop", [(1, 0, 0, 0, 1, 0), (1, 0, 0, 0, -1, 0), (0, 1, 0, -1, 0, 0)])
def test_series_reads_in_simpleitk_geometry(tmp_path, iop):
    hu = hu_volume()
    write_ct(tmp_path / "ct", hu, iop=iop, random_names=True, shuffle_numbers=True)
    image, series = read_dicom(tmp_path / "ct")
    assert np.array_equal(sitk.GetArrayFromImage(image), hu)
    assert image.GetPixelID() == sitk.sitkInt16
    # SimpleITK's own reading of the same files agrees voxel for voxel and in geometry
    ids = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(tmp_path / "ct"), series.series_uid)
    ref = sitk.ReadImage(list(ids))
    assert np.array_equal(sitk.GetArrayFromImage(ref), hu)
    assert np.allclose(ref.GetDirection(), image.GetDirection()) and np.allclose(ref.GetOrigin(), image.GetOrigin())
    assert np.allclose(image.GetSpacing(), (0.8, 0.9, 3.0))
    d = np.array(image.GetDirection()).reshape(3, 3)
    assert np.allclose(d[:, 0], iop[:3]) and np.allclose(d[:, 1], iop[3:]) and np.allclose(d[:, 2], normal_of(iop))
    # files[k] holds slice k
    for k, f in enumerate(series.files):
        ds = pydicom.dcmread(f)
        assert np.array_equal(ds.pixel_array.astype(np.int32) - 1024, hu[k])
        assert np.allclose([float(v) for v in ds.ImagePositionPatient], physical(image, (0, 0, k)), atol=1e-3)
    assert series.n_slices == 6 and series.rows == 16 and series.columns == 20
    assert series.study_uid == STUDY and series.frame_of_reference_uid == FOR and series.patient_id == "PT01"
    rec = series.record
    assert rec["n_slices"] == 6 and rec["skipped"] == [] and rec["multiframe"] is False


def test_localizers_and_a_second_series_are_skipped_and_recorded(tmp_path):
    folder = tmp_path / "ct"
    hu = hu_volume()
    main_paths = write_ct(folder, hu, description="main")
    write_ct(folder, hu_volume((4, 16, 20), 1), description="small", series_number=3, origin=(0, 0, 0))
    scout = generate_uid()
    write_localizer(folder, (1, 0, 0, 0, 0, -1), series_uid=scout, name="loc_ap.dcm")
    write_localizer(folder, (0, 1, 0, 0, 0, -1), series_uid=scout, name="loc_lat.dcm")
    sr = _base("1.2.840.10008.5.1.4.1.1.88.22", series_uid=generate_uid(), modality="SR")
    sr.save_as(folder / "report.dcm", enforce_file_format=True)
    (folder / "notes.txt").write_text("not DICOM", encoding="utf-8")
    image, series = read_dicom(folder)
    assert series.description == "main" and series.files == main_paths
    assert np.array_equal(sitk.GetArrayFromImage(image), hu)
    reasons = {s["description"]: s["reason"] for s in series.record["skipped"]}
    assert reasons["Topogram"] == "localizer"
    assert reasons["small"] == "not chosen: 4 slice(s)"
    assert reasons["Abdomen 1.0"].startswith("not an image (Enhanced SR")
    assert series.record["ignored_files"] == 1
    assert "most slices" in series.record["chosen_because"]
    assert json.loads(json.dumps(series.record)) == series.record  # goes into predict.json as is
    # forcing the smaller series
    small = next(s["series_uid"] for s in series.record["skipped"] if s["description"] == "small")
    image2, s2 = read_dicom(folder, small)
    assert s2.n_slices == 4 and image2.GetSize() == (20, 16, 4)
    with pytest.raises(InputError, match=r"--series 9\.9: not in .*; found "):
        find_series(folder, "9.9")


def test_orientations_differing_within_a_series_count_as_localizers(tmp_path):
    uid = generate_uid()
    write_localizer(tmp_path / "s", (1, 0, 0, 0, 0, -1), series_uid=uid, name="a.dcm")
    write_localizer(tmp_path / "s", (0, 1, 0, 0, 0, -1), series_uid=uid, name="b.dcm")
    for p in (tmp_path / "s").iterdir():  # no LOCALIZER in ImageType: the orientations give it away
        ds = pydicom.dcmread(p)
        ds.ImageType = ["ORIGINAL", "PRIMARY"]
        ds.save_as(p)
    with pytest.raises(InputError) as exc:
        find_series(tmp_path / "s")
    assert "holds only localizers" in str(exc.value) and "orientations differ" in str(exc.value)


def test_ties_go_to_the_thinnest_slices(tmp_path):
    write_ct(tmp_path / "ct", hu_volume(), description="thick", thickness=5.0)
    write_ct(tmp_path / "ct", hu_volume(seed=2), description="thin", thickness=1.0, series_number=5)
    assert find_series(tmp_path / "ct").description == "thin"


def test_non_axial_series_is_skipped(tmp_path):
    write_ct(tmp_path / "ct", hu_volume(), description="axial")
    write_ct(tmp_path / "ct", hu_volume((8, 16, 20)), description="coronal", iop=(1, 0, 0, 0, 0, -1), series_number=7)
    series = find_series(tmp_path / "ct")
    assert series.description == "axial"
    assert any(s["description"] == "coronal" and s["reason"].startswith("not axial") for s in series.record["skipped"])


@pytest.mark.parametrize("n_frames", [2, 6])
def test_enhanced_ct_reads_as_its_frames(tmp_path, n_frames):
    hu = hu_volume((n_frames, 16, 20))
    order = list(range(n_frames))[::-1]  # frames stored last slice first
    iop = (1, 0, 0, 0, -1, 0)
    write_enhanced_ct(tmp_path / "mf" / "enh.dcm", hu, iop=iop, frame_order=order, slope=0.5)
    image, series = read_dicom(tmp_path / "mf")
    assert series.multiframe and series.n_slices == n_frames and series.files == [tmp_path / "mf" / "enh.dcm"]
    assert series.frame_numbers == [order.index(k) + 1 for k in range(n_frames)]
    assert np.array_equal(sitk.GetArrayFromImage(image), hu)
    assert np.allclose(image.GetSpacing(), (0.8, 0.9, 3.0))
    assert np.allclose(image.GetOrigin(), (-10.0, 5.0, 2.5))
    assert np.allclose(image.GetDirection(), (1, 0, 0, 0, -1, 0, 0, 0, -1))
    # the same slices written as single-frame files read to the same image
    write_ct(tmp_path / "sf", hu, iop=iop)
    ref = read_series(find_series(tmp_path / "sf"))
    assert np.allclose(ref.GetOrigin(), image.GetOrigin()) and np.allclose(ref.GetDirection(), image.GetDirection())
    assert np.allclose(ref.GetSpacing(), image.GetSpacing())


# --- refusals: exit 2, one line naming the folder ------------------------------------------------


def _localizers_only(folder: Path) -> None:
    uid = generate_uid()
    write_localizer(folder, (1, 0, 0, 0, 0, -1), series_uid=uid, name="ap.dcm")
    write_localizer(folder, (0, 1, 0, 0, 0, -1), series_uid=uid, name="lat.dcm")


REFUSALS = [
    ("only localizers", _localizers_only, ["holds only localizers", "'Topogram' 2 file(s) CT (localizer)"]),
    ("no CT", lambda f: write_ct(f, hu_volume()) and [_set(p, Modality="MR") for p in f.iterdir()],
     ["no axial CT series", "modality MR, expected CT"]),
    ("gap", lambda f: write_ct(f, hu_volume(), skip=(3,)), ["uneven slice spacing", "gap 6 mm", "expected 3 mm"]),
    ("uneven", lambda f: write_ct(f, hu_volume(), offsets={4: 0.5}), ["uneven slice spacing", "expected 3 mm"]),
    ("one slice", lambda f: write_ct(f, hu_volume((1, 16, 20))), ["has 1 slice; expected a 3D CT volume"]),
    ("tilt header", lambda f: write_ct(f, hu_volume(), tilt=12.0), ["gantry tilt of 12 degrees"]),
    ("tilt positions", lambda f: write_ct(f, hu_volume(), shear=0.6), ["gantry-tilted", "11.31 degrees"]),
    ("equal series", lambda f: (write_ct(f, hu_volume()), write_ct(f, hu_volume(), series_number=4)),
     ["holds 2 DICOM series of equal size", "--series"]),
]


def _set(path: Path, **tags) -> None:
    ds = pydicom.dcmread(path)
    for k, v in tags.items():
        setattr(ds, k, v)
    ds.save_as(path)


@pytest.mark.parametrize("kind,make,needles", REFUSALS, ids=[r[0] for r in REFUSALS])
def test_reader_refusals_are_one_line_exit_2(tmp_path, kind, make, needles):
    folder = tmp_path / "pt01" / "CT"
    make(folder)
    with pytest.raises(InputError) as exc:
        find_series(folder)
    message = str(exc.value)
    assert "\n" not in message and message.startswith(str(folder) + ":")
    for needle in needles:
        assert needle in message, message
    r = CliRunner().invoke(main, ["import-dicom", str(folder), "--dataset", str(tmp_path / "ds"), "--case", "a"])
    assert r.exit_code == 2 and "Traceback" not in r.output
    errors = [ln for ln in r.output.splitlines() if ln.lower().startswith("error:")]
    assert len(errors) == 1 and str(folder) in errors[0] and needles[0] in errors[0], r.output
    assert not (tmp_path / "ds").exists()


def test_gap_tolerance_is_relative():
    assert SLICE_GAP_RTOL == 0.05


def test_a_small_jitter_within_tolerance_is_accepted(tmp_path):
    write_ct(tmp_path / "ct", hu_volume(), offsets={2: 0.1})  # 0.1 mm of 3 mm < 5 %
    assert find_series(tmp_path / "ct").n_slices == 6


# --- import-dicom ---------------------------------------------------------------------------------


def test_import_dicom_takes_the_main_series_beside_localizers(tmp_path):
    folder = tmp_path / "export"
    hu = hu_volume()
    write_ct(folder, hu, iop=(1, 0, 0, 0, -1, 0), random_names=True, shuffle_numbers=True)
    write_ct(folder, hu_volume((3, 16, 20)), series_number=9, description="small")
    _localizers_only(folder)
    r = CliRunner().invoke(main, ["import-dicom", str(folder), "--dataset", str(tmp_path / "ds"), "--case", "pt01"])
    assert r.exit_code == 0, r.output
    arr, geom = read_array(tmp_path / "ds" / "imagesTr" / "pt01_0000.nii.gz")
    assert np.array_equal(arr, hu)
    assert np.allclose(geom.direction, (1, 0, 0, 0, -1, 0, 0, 0, -1))


def test_import_dicom_reads_an_enhanced_ct(tmp_path):
    hu = hu_volume((2, 16, 20))
    write_enhanced_ct(tmp_path / "mf" / "x.dcm", hu)
    r = CliRunner().invoke(main, ["import-dicom", str(tmp_path / "mf"), "--dataset", str(tmp_path / "ds"), "--case", "e"])
    assert r.exit_code == 0, r.output
    arr, _ = read_array(tmp_path / "ds" / "imagesTr" / "e_0000.nii.gz")
    assert arr.shape == (2, 16, 20) and np.array_equal(arr, hu)


# --- discovery helpers ----------------------------------------------------------------------------


def test_series_folders_and_list_series(tmp_path):
    write_ct(tmp_path / "a" / "CT", hu_volume())
    write_ct(tmp_path / "a" / "CT", hu_volume((4, 16, 20)), series_number=8, description="second")
    write_ct(tmp_path / "a" / "CT", hu_volume((1, 16, 20)), series_number=9, description="key image")
    write_ct(tmp_path / "b", hu_volume())
    (tmp_path / "c").mkdir()
    _base("1.2.840.10008.5.1.4.1.1.88.22", series_uid=generate_uid(), modality="SR").save_as(
        tmp_path / "c" / "sr.dcm", enforce_file_format=True)
    assert series_folders(tmp_path) == [tmp_path / "a" / "CT", tmp_path / "b"]
    found = list_series(tmp_path / "a" / "CT")
    assert [s.description for s in found] == ["Abdomen 1.0", "second"]
    assert any(s["description"] == "key image" and "1 slice" in s["reason"] for s in found[0].record["skipped"])

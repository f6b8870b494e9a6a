"""Real CT from public packages, for the checks a phantom cannot make.

* Debian's ``invesalius-examples``: ``Cranium.inv3``, an InVesalius 3 project (a gzipped tar of
  plists and raw arrays) holding a real head CT ("ProMED CT 0051": 108 x 256 x 256 int16 HU,
  0.957 x 0.957 x 1.5 mm, air -1024, skull up to ~3000 HU). ``.ci/run`` installs the package.
* pydicom's bundled test files: ``CT_small.dcm`` (one 128 x 128 CT slice, 0.66 mm),
  ``693_J2KI.dcm`` (one 512 x 512 CT slice, 0.48 mm, lossy JPEG 2000, padded with -2000 HU
  outside the reconstruction circle) and ``MR_small.dcm`` (an MR slice, values 127..2145).
"""
from __future__ import annotations

import math
import os
import plistlib
import tarfile
from pathlib import Path

import numpy as np
import pytest

from analysis.imaging.io import Geometry

INVESALIUS = Path("/usr/share/doc/invesalius-examples/examples/Cranium.inv3")


def require(path: Path, package: str) -> Path:
    """``path``; the test is skipped with one line where the package is missing, but never under CI."""
    if not path.is_file():
        if os.environ.get("CI"):
            pytest.fail(f"{path} is missing under CI; .ci/run installs it (apt-get install -y {package})")
        pytest.skip(f"{path} not installed: apt-get install -y {package}")
    return path


def head_ct() -> tuple[np.ndarray, Geometry]:
    """The InVesalius head CT: HU ``(slices, rows, cols)`` int16 and an identity-direction geometry
    with the project's spacing (``main.plist``'s ``spacing`` is x, y, z in mm)."""
    with tarfile.open(require(INVESALIUS, "invesalius-examples"), "r:gz") as tar:
        members = {Path(m.name).name: m for m in tar.getmembers() if m.isfile()}
        main = plistlib.loads(tar.extractfile(members["main.plist"]).read())
        matrix = main["matrix"]
        raw = tar.extractfile(members[matrix["filename"]]).read()
    shape = tuple(int(s) for s in matrix["shape"])
    ct = np.frombuffer(raw, dtype=np.dtype(matrix["dtype"]).newbyteorder("<")).reshape(shape).astype(np.int16)
    spacing = tuple(float(s) for s in main["spacing"])
    return ct, Geometry(size=(shape[2], shape[1], shape[0]), spacing=spacing, origin=(0.0, 0.0, 0.0),
                        direction=(1, 0, 0, 0, 1, 0, 0, 0, 1))


def pydicom_slice(name: str) -> np.ndarray:
    """One of pydicom's bundled test files as values after its rescale, ``(rows, cols)`` float."""
    import pydicom
    from pydicom.data import get_testdata_file

    ds = pydicom.dcmread(get_testdata_file(name))
    return ds.pixel_array * float(ds.get("RescaleSlope", 1)) + float(ds.get("RescaleIntercept", 0))


def moved(ct: np.ndarray, geometry: Geometry, rotation_deg: float, shift_mm: tuple[float, float, float]) -> np.ndarray:
    """``ct`` moved rigidly about its centre (``rotation_deg`` about z, half of it about x, then ``shift_mm``),
    resampled linearly onto its own grid (air, -1024 HU, where it leaves nothing)."""
    import SimpleITK as sitk

    image = sitk.GetImageFromArray(ct)
    image.SetSpacing(geometry.spacing)
    image.SetOrigin(geometry.origin)
    image.SetDirection(geometry.direction)
    centre = image.TransformContinuousIndexToPhysicalPoint([(s - 1) / 2.0 for s in image.GetSize()])
    transform = sitk.Euler3DTransform(centre, math.radians(rotation_deg / 2), 0.0, math.radians(rotation_deg),
                                      shift_mm)
    return sitk.GetArrayFromImage(sitk.Resample(image, image, transform.GetInverse(), sitk.sitkLinear, -1024.0))

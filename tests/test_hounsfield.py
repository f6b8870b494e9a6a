"""Is it CT? (analysis.imaging.hounsfield.ct_problem) on synthetic volumes, real CT and a real MR."""
from __future__ import annotations

import numpy as np
import pytest

from analysis.imaging.hounsfield import AIR_OR_LUNG_HU, ct_problem
from tests.real_ct import head_ct, pydicom_slice


def _ct() -> np.ndarray:
    """A body (40 HU) with a bone (800 HU) in air, padded with -3024 HU in the corners."""
    ct = np.full((6, 64, 64), -1000.0, np.float32)
    yy, xx = np.mgrid[:64, :64]
    ct[:, (yy - 32) ** 2 + (xx - 32) ** 2 <= 22 ** 2] = 40.0
    ct[:, 28:36, 28:36] = 800.0
    ct[:, (yy - 32) ** 2 + (xx - 32) ** 2 > 32 ** 2] = -3024.0
    return ct


def test_synthetic_ct_passes_and_what_is_not_ct_is_named():
    ct = _ct()
    assert ct_problem(ct) is None and ct_problem(ct.astype(np.int16)) is None
    # an MR-like volume: 0..3057, no air
    mr = np.clip((ct + 1000.0) * 1.5, 0, None)
    mr[0, 0, 0] = 3057.0
    assert ct_problem(mr) == "values 0..3057 with nothing below 0: not CT in Hounsfield units (air is -1000 HU)"
    # a CT stored without its rescale intercept (air at 0 .. 24)
    assert ct_problem(np.maximum(ct, -1000.0) + 1024.0).startswith("values 24..1824 with nothing below 0")
    # air shifted by the padding's -2000: too little near -1000
    assert "with 0 % of voxels near -1000 (air; a CT's field of view holds at least 1 %)" in ct_problem(ct + 1024.0)
    # z-scored intensities
    z = (ct - ct.mean()) / ct.std()
    assert "with nothing near -1000: not CT in Hounsfield units" in ct_problem(z)
    # an empty field of view: air only
    assert ct_problem(np.full((4, 16, 16), -1000.0)) == (
        f"values -1000..-1000 with 0 % of voxels above {AIR_OR_LUNG_HU:.0f} HU: nothing denser than air or lung "
        f"in the field of view (a body is at least 1 %)")
    # values far above CT's range
    assert "% of voxels above 3071 HU (the top of CT's 12-bit range" in ct_problem(np.where(ct > -500, 9000.0, ct))
    # a CT cropped to its body: too little air (the reason for --no-ct-check)
    cropped = ct[:, 20:44, 20:44]
    assert ct_problem(cropped) == "values 40..800 with nothing below 0: not CT in Hounsfield units (air is -1000 HU)"


def test_a_little_air_in_a_large_volume():
    """0.5 % of voxels near -1000 is too little; 2 % is enough (a rule on shares, not on one voxel)."""
    ct = np.full((10, 100, 100), 40.0)
    ct.reshape(-1)[: ct.size // 200] = -1000.0
    assert "with 0.5 % of voxels near -1000" in ct_problem(ct)
    ct.reshape(-1)[: ct.size // 50] = -1000.0
    assert ct_problem(ct) is None


def test_real_ct_is_accepted_and_a_real_mr_refused():
    head, _ = head_ct()
    assert head.shape == (108, 256, 256) and head.min() == -1024 and head.max() > 2900
    assert ct_problem(head) is None
    for name in ("CT_small.dcm", "693_J2KI.dcm"):
        assert ct_problem(pydicom_slice(name)[None]) is None, name
    assert ct_problem(pydicom_slice("MR_small.dcm")[None]) == (
        "values 127..2145 with nothing below 0: not CT in Hounsfield units (air is -1000 HU)")


def test_require_ct_names_the_file_and_the_way_out():
    from analysis.errors import InputError
    from analysis.imaging.hounsfield import require_ct

    mr = pydicom_slice("MR_small.dcm")[None]
    with pytest.raises(InputError) as exc:
        require_ct(mr, "scans/mr.nii.gz")
    assert str(exc.value) == ("scans/mr.nii.gz: values 127..2145 with nothing below 0: not CT in Hounsfield units "
                              "(air is -1000 HU); --no-ct-check accepts it (a CT cropped tightly)")
    require_ct(mr, "scans/mr.nii.gz", check=False)
    require_ct(_ct(), "ct.nii.gz")

"""One canonical orientation for running models: LPS, identity direction.

CT files arrive in whatever storage order their exporter chose: DICOM-derived LPS
(direction identity), NIfTI from RAS tools (direction ``diag(-1, -1, 1)``), sagittal or
coronal acquisitions (axes permuted), flipped slice order. A network trained on one
order sees a mirrored or rotated patient in another. Every model in the project
therefore runs on the *canonical* view: the voxels reordered (transposed and flipped,
never resampled) so that the direction matrix is as close to identity as the
acquisition allows, i.e. ITK's index ``x`` runs to the patient's Left, ``y`` to
Posterior and ``z`` to Superior. In the numpy array ``(slices, rows, cols)`` =
``(z, y, x)`` of the canonical view, ``arr[k]`` is an axial slice (``k`` grows
towards the head), rows grow from anterior to posterior and columns from the
patient's right to left, which is also the radiological display of an axial slice.

This is what ``sitk.DICOMOrient(image, "LPS")`` does; :class:`Reorientation` computes
the same permutation and flips once from a :class:`~analysis.imaging.io.Geometry` and applies
them as numpy views (no copy, no SimpleITK round trip), in both directions. The tests
check it against DICOMOrient.

Oblique acquisitions (a direction column that is not axis-aligned) are mapped to the
nearest axis order: each index axis is assigned the patient axis its direction cosine
is largest along, as DICOMOrient does. The voxels are not resampled, so the canonical
direction is then a small rotation rather than the identity; the physical position of
every voxel is unchanged. :attr:`Reorientation.min_cosine` says how oblique the
acquisition is (1 for axis-aligned) and :attr:`Reorientation.is_oblique` flags one
whose smallest largest-cosine is below :data:`OBLIQUE_COS` (about 8 degrees). A
direction whose axes do not map to three distinct patient axes (about 45 degrees
between two of them) has no nearest axis order and is refused.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import SimpleITK as sitk

from analysis.imaging.io import Geometry

__all__ = ["CANONICAL", "OBLIQUE_COS", "Reorientation", "to_canonical", "from_canonical", "canonical_geometry"]

#: The canonical orientation, in DICOM's convention (the direction each index axis runs to):
#: identity direction.
CANONICAL = "LPS"
#: A direction whose every column has a largest cosine of at least this is called
#: axis-aligned (cos 8.1 degrees = 0.99); smaller values are oblique (still handled).
OBLIQUE_COS = 0.99


def _direction_matrix(geometry: Geometry) -> np.ndarray:
    if len(geometry.size) != 3 or len(geometry.direction) != 9:
        raise ValueError(f"expected a 3D geometry, got size {geometry.size}")
    return np.asarray(geometry.direction, np.float64).reshape(3, 3)


@dataclass(frozen=True)
class Reorientation:
    """The axis permutation and flips from a native storage order to the canonical one.

    All tuples are in ITK ``(x, y, z)`` axis order. Canonical axis ``p`` is native index
    axis ``perm[p]``, reversed when ``flip[p]``. Native arrays are ``(slices, rows, cols)``
    of the stored file; canonical arrays are ``(slices, rows, cols)`` of the canonical view.

    Attributes:
        perm: native ITK axis feeding each canonical ITK axis.
        flip: whether that axis is reversed.
        native: the native geometry it was computed from.
        min_cosine: smallest over the three index axes of the largest absolute direction
            cosine (1.0 for axis-aligned storage).
    """

    perm: tuple[int, int, int]
    flip: tuple[bool, bool, bool]
    native: Geometry
    min_cosine: float

    @classmethod
    def of(cls, native: Geometry) -> "Reorientation":
        """The reorientation of an image stored with geometry ``native``.

        Raises:
            ValueError: not a 3D geometry, or a direction matrix whose columns have no
                nearest distinct patient axes (e.g. two axes at 45 degrees).
        """
        d = _direction_matrix(native)
        dominant = np.argmax(np.abs(d), axis=0)          # patient axis of each native index axis
        if sorted(dominant.tolist()) != [0, 1, 2]:
            raise ValueError(f"direction {native.direction}: its axes do not map to three distinct "
                             f"patient axes; cannot reorient without resampling")
        perm = [0, 0, 0]
        flip = [False, False, False]
        for j, p in enumerate(dominant.tolist()):
            perm[p] = j
            flip[p] = bool(d[p, j] < 0)
        min_cos = float(np.abs(d).max(axis=0).min())
        return cls(tuple(perm), tuple(flip), native, min_cos)

    @property
    def is_identity(self) -> bool:
        """Whether the native order already is the canonical one (no transpose, no flip)."""
        return self.perm == (0, 1, 2) and not any(self.flip)

    @property
    def is_oblique(self) -> bool:
        """Whether some index axis is more than about 8 degrees off its patient axis."""
        return self.min_cosine < OBLIQUE_COS

    def numpy_axes(self) -> tuple[list[int], list[int]]:
        """``(order, flipped)``: :meth:`forward` is ``np.flip(a.transpose(order), flipped)`` (numpy axes)."""
        # numpy axis a is ITK axis 2 - a
        order = [2 - self.perm[2 - a] for a in range(3)]
        flipped = [a for a in range(3) if self.flip[2 - a]]
        return order, flipped

    def forward(self, native_array: np.ndarray) -> np.ndarray:
        """The canonical view of a native array (a numpy view, no copy).

        Args:
            native_array: ``(slices, rows, cols)`` in the stored file's order; extra
                trailing axes (channels) are carried along.

        Returns:
            ``(slices, rows, cols)`` in canonical order.

        Raises:
            ValueError: the array's first three axes do not match the native geometry.
        """
        arr = np.asarray(native_array)
        if tuple(arr.shape[:3]) != self.native.shape:
            raise ValueError(f"array shape {arr.shape} does not match the native geometry "
                             f"(slices, rows, cols) {self.native.shape}")
        order, flipped = self.numpy_axes()
        out = arr.transpose(order + list(range(3, arr.ndim)))
        if flipped:
            out = np.flip(out, axis=flipped)
        return out

    def backward(self, canonical_array: np.ndarray) -> np.ndarray:
        """The native-order view of a canonical array (exact inverse of :meth:`forward`).

        Args:
            canonical_array: ``(slices, rows, cols)`` in canonical order (trailing
                channel axes allowed).

        Returns:
            ``(slices, rows, cols)`` in the stored file's order: written with the native
            geometry it is physically identical to the canonical array.

        Raises:
            ValueError: the array's first three axes do not match the canonical shape.
        """
        arr = np.asarray(canonical_array)
        if tuple(arr.shape[:3]) != self.canonical_geometry.shape:
            raise ValueError(f"array shape {arr.shape} does not match the canonical "
                             f"(slices, rows, cols) {self.canonical_geometry.shape}")
        order, flipped = self.numpy_axes()
        if flipped:
            arr = np.flip(arr, axis=flipped)
        inverse = list(np.argsort(order))
        return arr.transpose(inverse + list(range(3, arr.ndim)))

    def index_forward(self, index_zyx: np.ndarray) -> np.ndarray:
        """Canonical array indices of native array indices (continuous indices allowed).

        Args:
            index_zyx: ``(n, 3)`` or ``(3,)`` indices ``(slice, row, col)`` of the native array.

        Returns:
            float64 indices of the same voxels in the canonical array, same shape.
        """
        idx = np.asarray(index_zyx, np.float64)
        native_xyz = idx[..., ::-1]
        size = np.asarray(self.native.size, np.float64)
        out = np.empty_like(native_xyz)
        for p in range(3):
            j = self.perm[p]
            out[..., p] = size[j] - 1 - native_xyz[..., j] if self.flip[p] else native_xyz[..., j]
        return out[..., ::-1]

    def stored_slices(self, canonical: np.ndarray | Sequence[int] | int) -> np.ndarray:
        """The stored file's slice numbers (axis 0 of its array) of canonical slices.

        Only an axially stored image (``perm[2] == 2``: the file's slice axis is the
        canonical one) shares its slices with the canonical view. Where the file's slice
        index runs from head to feet (``flip[2]``, e.g. a NIfTI with a negative ``z``
        direction), canonical slice ``k`` is stored slice ``slices - 1 - k``; otherwise
        the numbers agree.

        Args:
            canonical: slice indices of the canonical view (any shape; an int gives a 0-d array).

        Returns:
            int64 stored slice indices, same shape.

        Raises:
            ValueError: the image is not stored axially, or an index is outside ``0 .. slices - 1``.

        Examples:
            >>> from analysis.imaging.io import Geometry
            >>> head_to_feet = Geometry(size=(2, 2, 4), spacing=(1.0, 1.0, 2.5), origin=(0.0, 0.0, 0.0),
            ...                         direction=(1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, -1.0))
            >>> Reorientation.of(head_to_feet).stored_slices([0, 1, 3]).tolist()
            [3, 2, 0]
            >>> Reorientation.of(head_to_feet).canonical_slices(3).tolist()
            0
        """
        return self._slice_map(canonical)

    def canonical_slices(self, stored: np.ndarray | Sequence[int] | int) -> np.ndarray:
        """The canonical view's slice indices of stored slice numbers (inverse of :meth:`stored_slices`).

        Args:
            stored: slice numbers of the stored file's array (any shape).

        Returns:
            int64 canonical slice indices, same shape.

        Raises:
            ValueError: as :meth:`stored_slices`.
        """
        return self._slice_map(stored)

    def _slice_map(self, index: np.ndarray | Sequence[int] | int) -> np.ndarray:
        # reversing the slice axis is its own inverse: one map serves both directions
        if self.perm[2] != 2:
            raise ValueError(f"stored axes (x, y, z) -> {self.perm}: axis 0 of the stored array is not the "
                             f"axial slice axis, so its slices are not canonical slices")
        n = self.native.size[2]
        k = np.asarray(index, np.int64)
        if k.size and (k.min() < 0 or k.max() >= n):
            raise ValueError(f"slice index {k.min() if k.min() < 0 else k.max()} outside 0..{n - 1}")
        return n - 1 - k if self.flip[2] else k

    @property
    def canonical_geometry(self) -> Geometry:
        """Geometry of the canonical view (what DICOMOrient gives), ITK ``(x, y, z)`` order."""
        g = self.native
        d = _direction_matrix(g)
        size = np.asarray(g.size)
        spacing = np.asarray(g.spacing, np.float64)
        perm = list(self.perm)
        signs = np.where(self.flip, -1.0, 1.0)
        first = np.zeros(3)                               # native index of canonical voxel 0
        for p in range(3):
            if self.flip[p]:
                first[perm[p]] = size[perm[p]] - 1
        origin = np.asarray(g.origin, np.float64) + d @ (spacing * first)
        direction = d[:, perm] * signs[None, :]
        return Geometry(size=tuple(int(size[j]) for j in perm),
                        spacing=tuple(float(spacing[j]) for j in perm),
                        origin=tuple(float(o) for o in origin),
                        direction=tuple(float(v) for v in direction.ravel()))

    @property
    def canonical_spacing_zyx(self) -> tuple[float, float, float]:
        """Canonical voxel size in mm in numpy order ``(slices, rows, cols)``."""
        sx, sy, sz = self.canonical_geometry.spacing
        return (sz, sy, sx)


def canonical_geometry(native: Geometry) -> Geometry:
    """Geometry of the canonical view of an image stored with ``native`` geometry."""
    return Reorientation.of(native).canonical_geometry


def to_canonical(image: sitk.Image) -> sitk.Image:
    """The canonical (LPS) view of a SimpleITK image: ``sitk.DICOMOrient(image, "LPS")``.

    Voxels are permuted and flipped, not resampled; axis-aligned images get the
    identity direction, oblique ones the nearest axis order (see the module docstring).
    """
    return sitk.DICOMOrient(image, CANONICAL)


def from_canonical(array_canonical: np.ndarray, native: Geometry) -> np.ndarray:
    """A canonical-order array back in the native storage order.

    Args:
        array_canonical: ``(slices, rows, cols)`` in canonical order (e.g. a network's
            output on the canonical view); trailing channel axes allowed.
        native: the geometry of the stored file the canonical view came from.

    Returns:
        A C-contiguous ``(slices, rows, cols)`` array in the stored order: written with
        ``native`` geometry it is physically identical to ``array_canonical`` written
        with the canonical geometry.
    """
    return np.ascontiguousarray(Reorientation.of(native).backward(array_canonical))

"""Image I/O with explicit geometry, and atomic file writing.

Arrays follow SimpleITK's numpy layout: a 3D volume is ``(slices, rows, cols)``,
i.e. ``(z, y, x)``, while :class:`Geometry` holds size, spacing and origin in
ITK's ``(x, y, z)`` order, spacing in mm. Axis 0 of the array is the axial slice
index used everywhere in the project (``slices.csv``, ``z_first``/``z_last``).
"""
from __future__ import annotations

import contextlib
import errno
import gzip
import io
import json
import os
import re
import shutil
import socket
import struct
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import SimpleITK as sitk

from analysis.errors import InputError

#: Tolerances used when two images must share a geometry. Spacing is compared
#: relatively, origin in mm, direction cosines absolutely. They are loose enough
#: to absorb float32 round trips through NIfTI headers and tight enough to catch
#: any real resampling or mis-export (which shifts by a fraction of a voxel or more).
SPACING_RTOL = 1e-4
ORIGIN_ATOL_MM = 1e-3
DIRECTION_ATOL = 1e-4

NIFTI_SUFFIXES = (".nii.gz", ".nii")
READABLE_MASK_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")


@dataclass(frozen=True)
class Geometry:
    """Physical geometry of an image, in ITK ``(x, y, z)`` order.

    Attributes:
        size: voxels along x, y, z.
        spacing: voxel size in mm along x, y, z.
        origin: physical position in mm of the first voxel's centre.
        direction: row-major direction cosine matrix (9 values for 3D).
    """

    size: tuple[int, ...]
    spacing: tuple[float, ...]
    origin: tuple[float, ...]
    direction: tuple[float, ...]

    @classmethod
    def of(cls, image: sitk.Image) -> "Geometry":
        """Geometry of a SimpleITK image."""
        return cls(
            size=tuple(int(s) for s in image.GetSize()),
            spacing=tuple(float(s) for s in image.GetSpacing()),
            origin=tuple(float(o) for o in image.GetOrigin()),
            direction=tuple(float(d) for d in image.GetDirection()),
        )

    @property
    def voxel_volume_ml(self) -> float:
        """Volume of one voxel in ml (mm^3 / 1000)."""
        return float(np.prod(self.spacing)) / 1000.0

    @property
    def shape(self) -> tuple[int, ...]:
        """Numpy array shape ``(slices, rows, cols)`` of an image with this geometry."""
        return tuple(reversed(self.size))

    def apply_to(self, image: sitk.Image) -> sitk.Image:
        """Copy spacing, origin and direction onto ``image`` (in place) and return it."""
        image.SetSpacing(self.spacing)
        image.SetOrigin(self.origin)
        image.SetDirection(self.direction)
        return image

    def mismatch(self, other: "Geometry") -> str | None:
        """Describe the first difference from ``other``, or None when they agree.

        Sizes must be equal; spacing agrees within ``SPACING_RTOL`` (relative),
        origin within ``ORIGIN_ATOL_MM`` mm, direction within ``DIRECTION_ATOL``.
        """
        if self.size != other.size:
            return f"size {other.size} differs from {self.size}"
        if not np.allclose(other.spacing, self.spacing, rtol=SPACING_RTOL, atol=0):
            return f"spacing {_fmt(other.spacing)} differs from {_fmt(self.spacing)}"
        if not np.allclose(other.origin, self.origin, rtol=0, atol=ORIGIN_ATOL_MM):
            return f"origin {_fmt(other.origin)} differs from {_fmt(self.origin)}"
        if not np.allclose(other.direction, self.direction, rtol=0, atol=DIRECTION_ATOL):
            return f"direction {_fmt(other.direction)} differs from {_fmt(self.direction)}"
        return None

    def to_json(self) -> dict[str, Any]:
        return {"size": list(self.size), "spacing": list(self.spacing),
                "origin": list(self.origin), "direction": list(self.direction)}


def _fmt(values: tuple[float, ...]) -> str:
    return "(" + ", ".join(f"{v:.6g}" for v in values) + ")"


#: Floating-point header fields whose non-finite values ITK does not catch (nibabel names).
_FINITE_FIELDS = ("pixdim", "quatern_b", "quatern_c", "quatern_d", "qoffset_x", "qoffset_y", "qoffset_z",
                  "srow_x", "srow_y", "srow_z", "vox_offset", "scl_slope", "scl_inter")


def _nifti_header(raw: bytes) -> Any | None:
    """The NIfTI-1 or NIfTI-2 header (nibabel, either byte order) of a file's first bytes, or None."""
    import nibabel as nib

    for klass in (nib.Nifti1Header, nib.Nifti2Header):
        size = klass.template_dtype.itemsize  # 348 / 540
        if len(raw) < size:
            continue
        try:
            header = klass.from_fileobj(io.BytesIO(raw[:size]), check=False)
        except Exception:  # nibabel raises several types for foreign bytes
            continue
        if int(header["sizeof_hdr"]) == size:
            return header
    return None


def _nifti_expected_bytes(header: Any) -> int | None:
    """Bytes a complete NIfTI file holds (vox_offset + voxel data), from its nibabel header."""
    dims = [int(d) for d in header["dim"]]
    bitpix = int(header["bitpix"])
    if not 1 <= dims[0] <= 7 or bitpix <= 0:
        return None
    n = 1
    for d in dims[1:dims[0] + 1]:
        n *= max(d, 1)
    return int(header["vox_offset"]) + n * bitpix // 8


def _nifti_header_problem(header: Any) -> str | None:
    """A problem with a NIfTI header's geometry, offset or scaling fields that ITK does not
    catch, or None. ITK's reader hangs (not fails) on a non-finite sform, and turns
    non-finite pixdims into nonsense spacings, so these fields are checked first."""
    for name in _FINITE_FIELDS:
        values = np.atleast_1d(np.asarray(header[name], np.float64))
        if not np.isfinite(values).all():
            return f"header field {name} holds non-finite values {_fmt(tuple(float(v) for v in values))}"
    return None


def _expected_bytes(path: Path, raw: bytes) -> int | None:
    """The size a NIfTI file's header promises, after refusing a corrupt header; None for bytes
    that are not a NIfTI header (ITK then reports what they are)."""
    header = _nifti_header(raw)
    if header is None:
        return None
    problem = _nifti_header_problem(header)
    if problem:
        raise InputError(f"{path}: corrupt NIfTI header ({problem}); expected a valid NIfTI file")
    return _nifti_expected_bytes(header)


def check_nifti_complete(path: Path) -> None:
    """Refuse a truncated NIfTI file.

    ITK reads a truncated ``.nii.gz`` without complaint and fills the missing voxels, so
    completeness is checked here: the gzip trailer's uncompressed size (or, for multi-member
    or very large files, a full decompression) must match the size the header promises.

    Raises:
        InputError: the file is shorter than its header says, or its gzip stream is cut.
    """
    name = path.name.lower()
    if name.endswith(".nii"):
        with open(path, "rb") as fh:
            expected = _expected_bytes(path, fh.read(540))
        if expected is not None and path.stat().st_size < expected:
            raise InputError(f"{path}: truncated NIfTI file ({path.stat().st_size} bytes, header promises {expected})")
        return
    if not name.endswith(".nii.gz"):
        return
    try:
        with gzip.open(path, "rb") as fh:
            raw = fh.read(540)
    except (OSError, EOFError, zlib.error) as exc:
        raise InputError(f"{path}: truncated or not a gzip-compressed NIfTI file ({exc})") from None
    expected = _expected_bytes(path, raw)
    if expected is None:
        return
    with open(path, "rb") as fh:
        fh.seek(-4, os.SEEK_END)
        isize = struct.unpack("<I", fh.read(4))[0]
    if isize == expected % 2**32:
        return
    total = 0
    try:
        with gzip.open(path, "rb") as fh:
            while chunk := fh.read(1 << 24):
                total += len(chunk)
    except (OSError, EOFError, zlib.error):
        raise InputError(f"{path}: truncated or corrupt gzip stream; expected a complete .nii.gz file "
                         f"(an interrupted download or copy?)") from None
    if total < expected:
        raise InputError(f"{path}: truncated NIfTI file ({total} bytes uncompressed, header promises {expected})")


def _require_complete_file(path: str | os.PathLike) -> Path:
    """The path, after checking the file exists, is not empty and is not a truncated NIfTI."""
    p = Path(path)
    if not p.is_file():
        raise InputError(f"{p}: file not found")
    if p.stat().st_size == 0:
        raise InputError(f"{p}: file is empty, expected a NIfTI image")
    check_nifti_complete(p)
    return p


def read_image(path: str | os.PathLike, *, ndim: int | None = 3) -> sitk.Image:
    """Read an image file, turning every failure into a one-line :class:`InputError`.

    Args:
        path: NIfTI (``.nii``/``.nii.gz``), NRRD or MetaImage file.
        ndim: required dimension (3 for volumes); None accepts any.

    Raises:
        InputError: missing, empty, truncated or unreadable file, or wrong dimension.
    """
    p = _require_complete_file(path)
    try:
        image = sitk.ReadImage(str(p))
    except RuntimeError as exc:  # SimpleITK reports every read failure as RuntimeError
        reason = _first_line(str(exc))
        raise InputError(f"{p}: not a readable image ({reason}); expected a NIfTI file") from None
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(f"{p}: has {image.GetNumberOfComponentsPerPixel()} components per voxel, expected a scalar image")
    if ndim is not None and image.GetDimension() != ndim:
        raise InputError(f"{p}: is a {image.GetDimension()}D image, expected {ndim}D")
    return image


def _first_line(text: str) -> str:
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    # SimpleITK's messages end with the useful part; keep it short.
    useful = [ln for ln in lines if "ERROR" not in ln.upper()[:8]] or lines
    msg = useful[-1] if useful else "unknown error"
    return msg[:200]


def count_nonfinite(path: str | os.PathLike) -> int:
    """Number of NaN or infinite voxels stored in a floating-point NIfTI file (0 for integer files).

    ITK's NIfTI reader silently turns NaN into 0, so the stored values are read with
    nibabel instead. Only floating-point files are decoded a second time.
    """
    import nibabel as nib  # local: only needed for float NIfTI files

    p = Path(path)
    if not p.name.lower().endswith((".nii", ".nii.gz")):
        return 0
    try:
        img = nib.load(str(p))
        if not np.issubdtype(img.get_data_dtype(), np.floating):
            return 0
        data = np.asanyarray(img.dataobj)
    except Exception as exc:  # nibabel raises many types for corrupt files
        raise InputError(f"{p}: pixel data cannot be decoded ({_first_line(str(exc))})") from None
    return int(data.size - np.count_nonzero(np.isfinite(data)))


def nonfinite_error(where: str | os.PathLike, bad: int) -> InputError:
    """The one message for a CT holding NaN or infinite voxels (``where``: its file or case)."""
    return InputError(f"{where}: {bad} voxel(s) are NaN or infinite; expected finite values (HU)")


def require_finite(path: str | os.PathLike, values: np.ndarray | None = None, *,
                   where: str | os.PathLike | None = None) -> None:
    """Refuse an image holding NaN or infinite voxels, with one message (:func:`nonfinite_error`):
    the one finite check of every CT the project reads (``predict``, ``followup``, ``gradcam``,
    ``analyze``, ``validate``) and of every image :func:`read_array` reads.

    Two places can hide them: the decoded voxels (a floating-point volume: an NRRD file, a DICOM
    series with a fractional rescale), and a NIfTI file itself, whose NaN ITK's reader silently
    decodes as 0 (:func:`count_nonfinite` reads the stored values with nibabel).

    Args:
        path: the image file, or a DICOM series folder (then only ``values`` are checked).
        values: the decoded voxels when they are read already; None checks the file alone (its
            header and, for a floating-point NIfTI file, one nibabel decode; no ITK decode).
        where: what the message names for ``values`` (default ``path``, e.g. a DICOM case with
            its series UID).

    Raises:
        InputError: :func:`nonfinite_error`.
    """
    if values is not None:
        if not np.issubdtype(values.dtype, np.floating):
            return  # ITK decodes a floating-point file to floating point: integer voxels came from integers
        bad = int(values.size - np.count_nonzero(np.isfinite(values)))
        if bad:
            raise nonfinite_error(path if where is None else where, bad)
    bad = count_nonfinite(path)  # 0 for anything but a floating-point NIfTI file
    if bad:
        raise nonfinite_error(path, bad)


def read_array(path: str | os.PathLike, *, ndim: int | None = 3) -> tuple[np.ndarray, Geometry]:
    """Read an image as a numpy array ``(slices, rows, cols)`` and its :class:`Geometry`.

    Args:
        path: image file.
        ndim: required dimension (None accepts any).

    Raises:
        InputError: see :func:`read_image`; NaN/infinite values (:func:`require_finite`); pixel
            data that cannot be decoded.
    """
    image = read_image(path, ndim=ndim)
    try:
        array = sitk.GetArrayFromImage(image)
    except RuntimeError as exc:
        raise InputError(f"{path}: pixel data cannot be decoded ({_first_line(str(exc))})") from None
    require_finite(path, array)
    return array, Geometry.of(image)


def read_header(path: str | os.PathLike, *, ndim: int | None = 3) -> Geometry:
    """Geometry of an image file without decoding its voxels (fast).

    Args:
        path: image file.
        ndim: required dimension (3 for volumes); None accepts any.

    Raises:
        InputError: missing, empty, truncated or unreadable file, a vector image, or
            the wrong dimension.
    """
    p = _require_complete_file(path)
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(p))
    try:
        reader.ReadImageInformation()
    except RuntimeError as exc:
        raise InputError(f"{p}: not a readable image ({_first_line(str(exc))}); expected a NIfTI file") from None
    if reader.GetNumberOfComponents() != 1:
        raise InputError(f"{p}: has {reader.GetNumberOfComponents()} components per voxel, expected a scalar image")
    if ndim is not None and reader.GetDimension() != ndim:
        raise InputError(f"{p}: is a {reader.GetDimension()}D image, expected {ndim}D")
    return Geometry(
        size=tuple(int(s) for s in reader.GetSize()),
        spacing=tuple(float(s) for s in reader.GetSpacing()),
        origin=tuple(float(o) for o in reader.GetOrigin()),
        direction=tuple(float(d) for d in reader.GetDirection()),
    )


def array_to_image(array: np.ndarray, geometry: Geometry) -> sitk.Image:
    """Wrap ``array`` ``(slices, rows, cols)`` as a SimpleITK image with ``geometry``.

    Raises:
        ValueError: the array's shape does not match the geometry's size.
    """
    if tuple(array.shape) != geometry.shape:
        raise ValueError(f"array shape {array.shape} does not match geometry size {geometry.size} (x, y, z)")
    image = sitk.GetImageFromArray(array)
    return geometry.apply_to(image)


def umask_mode(mode: int = 0o666) -> int:
    """``mode`` as the process's umask leaves it: what ``open()`` (0o666) or ``mkdir()`` (0o777)
    would create. ``mkstemp``/``mkdtemp`` create 0600/0700 whatever the umask, so every atomic
    writer here sets this mode on its temporary file or folder before moving it into place."""
    try:  # Linux >= 4.7: read it without changing it (os.umask would, for every thread)
        with open("/proc/self/status", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return mode & ~int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    current = os.umask(0o022)
    os.umask(current)
    return mode & ~current


#: What the system answers when a folder cannot be written into: a read-only file system (a
#: `docker run -v ...:ro` mount), or permissions.
_NOT_WRITABLE = (errno.EROFS, errno.EACCES, errno.EPERM)


def not_writable(folder: str | os.PathLike, reason: str) -> InputError:
    """The one-line error for an output that would go into a folder that cannot be written."""
    return InputError(f"{folder}: cannot write into this folder ({reason}); the command writes its output here, "
                      f"so give a writable folder (a read-only mount, or another user's folder?)")


def require_writable(folder: str | os.PathLike) -> None:
    """Refuse before any work when this process cannot create files in ``folder`` (or, when it
    does not exist yet, in its nearest existing parent): a read-only mount, or permissions.
    ``os.access`` asks the kernel with the real user's rights, so root passes a ``chmod a-w``
    folder (root can write there) but not a read-only mount.

    Raises:
        InputError: the folder cannot be written.
    """
    folder = Path(folder)
    existing = next((p for p in (folder, *folder.parents) if p.exists()), None)
    if existing is not None and not os.access(existing, os.W_OK | os.X_OK):
        read_only = os.statvfs(existing).f_flag & os.ST_RDONLY
        raise not_writable(folder, os.strerror(errno.EROFS if read_only else errno.EACCES))


@contextlib.contextmanager
def _writing_into(folder: Path) -> Iterator[None]:
    """Turn the failure to create a file or folder in ``folder`` into :func:`not_writable`."""
    try:
        yield
    except OSError as exc:
        if exc.errno in _NOT_WRITABLE:
            raise not_writable(folder, exc.strerror or str(exc)) from None
        raise


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, *, suffix: str = ".tmp") -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it gets the umask's mode
    (:func:`umask_mode`) and replaces ``path``, on any exception it is removed. Every file
    the project writes goes through here, so none is ever seen half-written.

    Args:
        path: the file to produce (its folder is created).
        suffix: ending of the temporary name (writers that choose a format by it need it).
    """
    path = Path(path)
    with _writing_into(path.parent):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, umask_mode())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (:func:`atomic_file`), flushed to disk."""
    with atomic_file(path) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
    return Path(path)


def write_image(image: sitk.Image, path: str | os.PathLike, *, compress: bool = True) -> Path:
    """Write a SimpleITK image atomically (temporary file in the same folder, then rename)."""
    path = Path(path)
    suffix = ".nii.gz" if path.name.endswith(".nii.gz") else path.suffix
    with atomic_file(path, suffix=f".tmp{suffix}") as tmp:
        sitk.WriteImage(image, str(tmp), useCompression=compress)
    return path


def write_array(array: np.ndarray, geometry: Geometry, path: str | os.PathLike) -> Path:
    """Write ``array`` ``(slices, rows, cols)`` with exactly ``geometry``, atomically."""
    return write_image(array_to_image(array, geometry), path)


def write_mask(mask: np.ndarray, reference: Geometry, path: str | os.PathLike) -> Path:
    """Write a binary mask as uint8 0/1 with the reference image's exact geometry."""
    return write_array((np.asarray(mask) != 0).astype(np.uint8), reference, path)


# --- atomic text / folder outputs -------------------------------------------------


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write text to ``path`` as UTF-8, atomically (never half-written)."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Write ``obj`` as indented JSON atomically."""
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def read_json(path: str | os.PathLike, *, what: str = "JSON file") -> Any:
    """Read a JSON file, raising a one-line :class:`InputError` on any problem."""
    p = Path(path)
    if not p.is_file():
        raise InputError(f"{p}: {what} not found")
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"{p}: malformed {what} ({exc})") from None


_HOST = re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname())[:40] or "host"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def remove_stale_partials(final: str | os.PathLike) -> list[Path]:
    """Remove hidden ``.NAME.<host>.<pid>.*.partial`` siblings of ``final`` left by killed runs.

    :func:`atomic_directory` builds ``final`` in such a sibling. A process killed by SIGKILL
    (or a power cut) cannot remove it; the next run for the same output removes those whose
    process no longer exists on this host. Partials of live processes (a concurrent run) and
    of other hosts (a shared file system) are left alone; every reader in the project
    ignores hidden files and folders, so a leftover is never mistaken for output.

    Returns:
        The folders removed.
    """
    final = Path(final)
    pattern = re.compile(re.escape(f".{final.name}.") + r"(?P<host>[A-Za-z0-9-]+)\.(?P<pid>\d+)\..*partial$")
    removed = []
    if not final.parent.is_dir():
        return removed
    for p in final.parent.iterdir():
        m = pattern.match(p.name)
        if m and m["host"] == _HOST and int(m["pid"]) != os.getpid() and not _pid_alive(int(m["pid"])):
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed


def check_output_folder(out: str | os.PathLike, *, overwrite: bool, what: str = "output folder",
                        hint: str = "pass --overwrite to replace it", allow_empty: bool = True) -> None:
    """The one rule for outputs a command owns whole: ``out`` may be missing or an empty
    folder; a non-empty folder only with ``overwrite``.

    Args:
        allow_empty: False: an existing folder, even empty, also needs ``overwrite`` (a
            command that promises to refuse any existing OUT, e.g. followup and timeline).

    Raises:
        InputError: ``out`` is a file, or a non-empty folder without ``overwrite``.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise InputError(f"{out}: exists and is not a folder")
    if out.is_dir() and not overwrite:
        if not allow_empty:
            raise InputError(f"{out}: exists; {hint}")
        if any(out.iterdir()):
            raise InputError(f"{out}: {what} exists and is not empty; {hint}")


@contextlib.contextmanager
def atomic_directory(final: str | os.PathLike, *, overwrite: bool = False) -> Iterator[Path]:
    """Build an output folder in a temporary sibling and move it into place on success.

    On any exception the temporary folder is removed and ``final`` is untouched, so a
    failed or interrupted command leaves no partial output.

    Args:
        final: the folder to produce.
        overwrite: replace an existing non-empty ``final``; otherwise refuse.

    Raises:
        InputError: ``final`` exists, is not empty, and ``overwrite`` is False.
    """
    final = Path(final)
    check_output_folder(final, overwrite=overwrite)
    with _writing_into(final.parent):
        final.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_partials(final)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.{_HOST}.{os.getpid()}.", suffix=".partial",
                                    dir=final.parent))
    os.chmod(tmp, umask_mode(0o777))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists():
        trash = final.with_name(f".{final.name}.{_HOST}.{os.getpid()}.old.partial")
        os.replace(final, trash)
        os.replace(tmp, final)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(tmp, final)

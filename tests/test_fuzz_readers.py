"""Fuzzing the image readers with corrupted NIfTI bytes (seeded, a few hundred inputs, seconds).

Every input must either read successfully or raise :class:`analysis.errors.InputError`
with a one-line message naming the file; any other exception (or a traceback from
``validate``) is a failure. Mutations: bit flips in the header and in the data, in plain
``.nii`` and in ``.nii.gz``; truncations; random values in header fields (dimensions,
datatype, bitpix, vox_offset, pixdim, scaling, qform/sform); random bytes.
"""
from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest

from analysis.errors import InputError
from analysis.imaging.io import read_array, read_header, write_array
from tests.badinput import error_lines, invoke
from tests.conftest import make_geometry, write_tiny_cohort

SEED = 20240601
N_PER_KIND = 50

#: NIfTI-1 header fields: name -> (byte offset, struct format) (little endian).
FIELDS = {
    "dim": (40, "8h"), "intent_code": (68, "h"), "datatype": (70, "h"), "bitpix": (72, "h"),
    "pixdim": (76, "8f"), "vox_offset": (108, "f"), "scl_slope": (112, "f"), "scl_inter": (116, "f"),
    "qform_code": (252, "h"), "sform_code": (254, "h"), "quatern": (256, "6f"), "srow": (280, "12f"),
    "magic": (344, "4s"), "sizeof_hdr": (0, "i"),
}


def _base_files(tmp: Path) -> dict[str, bytes]:
    """Valid files to corrupt: int16 CT and float32 CT, as .nii (raw bytes) and .nii.gz."""
    rng = np.random.default_rng(SEED)
    geom = make_geometry((4, 6, 5))
    out = {}
    for name, arr in (("ct_int16", rng.integers(-1000, 1500, (4, 6, 5)).astype(np.int16)),
                      ("ct_float", rng.normal(0, 300, (4, 6, 5)).astype(np.float32))):
        path = write_array(arr, geom, tmp / f"{name}.nii")
        out[f"{name}.nii"] = path.read_bytes()
        out[f"{name}.nii.gz"] = gzip.compress(out[f"{name}.nii"], mtime=0)
    return out


def _random_field(rng: np.random.Generator, raw: bytes) -> bytes:
    name = rng.choice(sorted(FIELDS))
    offset, fmt = FIELDS[name]
    data = bytearray(raw)
    n = struct.calcsize("<" + fmt)
    if fmt.endswith("s"):
        value = bytes(rng.integers(0, 256, n, dtype=np.uint8))
    else:
        kind, count = fmt[-1], int(fmt[:-1] or 1)
        pool = {"h": [0, 1, -1, 2, 3, 4, 5, 7, 8, 16, 64, 512, 32767, -32768],
                "i": [0, 1, -1, 348, 540, 2**31 - 1],
                "f": [0.0, -1.0, 1e-30, 1e30, float("nan"), float("inf"), 352.0, 351.0, 7.0]}[kind]
        values = list(struct.unpack("<" + fmt, raw[offset:offset + n]))
        for i in rng.choice(count, size=int(rng.integers(1, count + 1)), replace=False):
            values[i] = pool[int(rng.integers(len(pool)))]
        value = struct.pack("<" + fmt, *values)
    data[offset:offset + n] = value
    return bytes(data)


def fuzz_inputs(base: dict[str, bytes], n: int = N_PER_KIND, seed: int = SEED):
    """Yield ``(label, filename, bytes)``: ``n`` corrupted inputs of each kind, deterministically."""
    rng = np.random.default_rng(seed)
    names = sorted(base)
    for i in range(n):
        name = names[i % len(names)]
        raw_name = name[:-3] if name.endswith(".gz") else name
        raw = base[raw_name]
        data = bytearray(base[name])
        # bit flips: mostly in the header (first 352 bytes of the raw file), sometimes anywhere
        for _ in range(int(rng.integers(1, 9))):
            j = int(rng.integers(0, min(352, len(data)) if rng.random() < 0.7 else len(data)))
            data[j] ^= 1 << int(rng.integers(0, 8))
        yield f"flip-{i}", name, bytes(data)
        flipped_raw = bytearray(raw)
        for _ in range(int(rng.integers(1, 5))):
            flipped_raw[int(rng.integers(0, 352))] ^= 1 << int(rng.integers(0, 8))
        yield f"flip-gz-header-{i}", raw_name + ".gz", gzip.compress(bytes(flipped_raw), mtime=0)
        cut = int(rng.integers(0, len(base[name])))
        yield f"truncate-{i}", name, base[name][:cut]
        field = _random_field(rng, raw)
        yield f"field-{i}", raw_name, field
        yield f"field-gz-{i}", raw_name + ".gz", gzip.compress(field, mtime=0)
        size = int(rng.integers(1, 2000))
        junk = bytes(rng.integers(0, 256, size, dtype=np.uint8))
        if rng.random() < 0.5:  # random bytes behind a valid-looking start
            junk = raw[: int(rng.integers(4, 352))] + junk
        yield f"random-{i}", ["x.nii", "x.nii.gz"][i % 2], junk if i % 4 < 2 else gzip.compress(junk, mtime=0)


def _check_reader(path: Path) -> str:
    """Read with both readers; return 'ok' or 'input-error', raising on anything else."""
    outcome = "ok"
    for reader in (read_header, read_array):
        try:
            reader(path)
        except InputError as exc:
            msg = str(exc)
            assert "\n" not in msg and str(path) in msg, f"{path.name}: {msg!r}"
            outcome = "input-error"
    return outcome


def test_readers_raise_only_clean_input_errors(tmp_path):
    base = _base_files(tmp_path)
    outcomes: dict[str, int] = {}
    failures = []
    for label, name, data in fuzz_inputs(base):
        path = tmp_path / label / name
        path.parent.mkdir()
        path.write_bytes(data)
        try:
            result = _check_reader(path)
        except Exception as exc:  # noqa: BLE001 - the point of the test
            failures.append(f"{label}/{name}: {type(exc).__name__}: {str(exc)[:200]}")
            continue
        outcomes[result] = outcomes.get(result, 0) + 1
    assert not failures, f"{len(failures)} input(s) gave tracebacks:\n" + "\n".join(failures[:20])
    assert sum(outcomes.values()) == 6 * N_PER_KIND
    # the mutations are real: most inputs are refused, and some still read
    assert outcomes.get("input-error", 0) > 2 * N_PER_KIND and outcomes.get("ok", 0) > 0, outcomes


def test_validate_gives_one_line_errors_on_corrupted_images(tmp_path):
    base = _base_files(tmp_path)
    ds = write_tiny_cohort(tmp_path / "ds", n_cases=1, shape=(4, 6, 5))
    image = ds / "imagesTr" / "case_000_0000.nii.gz"
    gz = [(label, data) for label, name, data in fuzz_inputs(base, n=12, seed=SEED + 1) if name.endswith(".gz")]
    codes = {}
    for label, data in gz:
        image.write_bytes(data)
        result = invoke(["validate", ds])
        text = result.output + result.stderr
        assert result.exception is None or isinstance(result.exception, SystemExit), f"{label}: {result.exception!r}"
        assert "Traceback" not in text, f"{label}: {text}"
        assert result.exit_code in (0, 2), f"{label}: exit {result.exit_code}: {text}"
        if result.exit_code == 2:
            assert error_lines(text) and all("ds/" in ln for ln in error_lines(text)), f"{label}: {text}"
        codes[result.exit_code] = codes.get(result.exit_code, 0) + 1
    assert codes.get(2, 0) >= len(gz) // 2, codes


@pytest.mark.parametrize("kind", ["flip", "truncate", "field", "random"])
def test_generator_is_deterministic(tmp_path, kind):
    base = _base_files(tmp_path)
    a = [d for label, _, d in fuzz_inputs(base, n=5) if label.startswith(kind)]
    b = [d for label, _, d in fuzz_inputs(base, n=5) if label.startswith(kind)]
    assert a == b and len(set(a)) > 1

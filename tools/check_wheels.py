#!/usr/bin/env python
"""Check that every installed file still is the file its wheel installed (the RECORD hashes).

pip installs a wheel's files and writes their sha256 into ``<name>.dist-info/RECORD``
(PEP 376, PEP 627; the wheel format's RECORD, PEP 427). When two wheels ship a file of the
same path, the second install overwrites the first's copy without a word, and ``pip check``
(which compares only the declared requirements) does not notice. That is what happens when
TensorFlow's CUDA 12 wheels land beside torch's CUDA 13 wheels: ``nvidia-cudnn-cu12`` and
``nvidia-cudnn-cu13`` both install ``nvidia/cudnn/lib/libcudnn*.so.9``, the NCCL wheels both
``nvidia/nccl/lib/libnccl.so.2``, and one framework then loads libraries built for the other
CUDA. This check needs no GPU.

    python tools/check_wheels.py [SITE_PACKAGES]     # default: this interpreter's site-packages

Every RECORD entry with a hash is checked (entries without one, such as RECORD itself and
``.pyc`` files, are skipped). A file whose content differs from its RECORD, or that is
missing, is reported under the distribution that installed it, with the other installed
distributions whose RECORD lists the same path (the ones that overwrote or removed it) and,
where the file now holds one of their copies exactly, which one. Exit status: 0 when every
file matches, 1 when some do not, 2 when SITE_PACKAGES is not a folder of installed
distributions. Only the standard library is used, so it runs in any environment it checks.
"""
from __future__ import annotations

import argparse
import base64
import csv
import hashlib
import os
import sys
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class Entry:
    """One RECORD line: a path relative to the site-packages folder and its ``sha256=`` digest."""

    path: str
    digest: str | None


@dataclass
class Distribution:
    """An installed distribution: its name and version (from the dist-info folder) and its RECORD."""

    name: str
    version: str
    record: Path
    entries: list[Entry] = field(default_factory=list)

    @property
    def label(self) -> str:
        return f"{self.name} {self.version}"


@dataclass(frozen=True)
class Problem:
    """A file that is not what its distribution installed.

    Attributes:
        dist: the distribution whose RECORD lists the file.
        path: the path as written in that RECORD (relative to the site-packages folder).
        kind: ``"differs"`` (content does not match the hash) or ``"missing"``.
        also_listed_by: other distributions whose RECORD lists the same file.
        now_holds: the one of those whose recorded hash the file's content matches, if any.
    """

    dist: str
    path: str
    kind: str
    also_listed_by: tuple[str, ...]
    now_holds: str | None


def _metadata_name_version(dist_info: Path) -> tuple[str, str]:
    """Name and version from METADATA's headers (the folder name is normalised and may differ)."""
    name, version = None, None
    metadata = dist_info / "METADATA"
    if metadata.is_file():
        with metadata.open(encoding="utf-8", errors="replace") as fh:
            for line in fh:
                if not line.strip():
                    break
                key, _, value = line.partition(":")
                if key == "Name" and name is None:
                    name = value.strip()
                elif key == "Version" and version is None:
                    version = value.strip()
    if name is None or version is None:
        stem_name, _, stem_version = dist_info.name[: -len(".dist-info")].partition("-")
        name, version = name or stem_name, version or stem_version
    return name, version


def read_distributions(site: Path) -> list[Distribution]:
    """Every ``*.dist-info`` folder with a RECORD in ``site``, sorted by name.

    Args:
        site: a site-packages folder.

    Returns:
        The distributions with their RECORD entries (digest ``None`` where the line has no
        ``sha256=`` hash).
    """
    dists = []
    for dist_info in sorted(site.glob("*.dist-info")):
        record = dist_info / "RECORD"
        if not record.is_file():
            continue
        name, version = _metadata_name_version(dist_info)
        dist = Distribution(name, version, record)
        with record.open(encoding="utf-8", newline="") as fh:
            for row in csv.reader(fh):
                if not row or not row[0]:
                    continue
                algo, _, digest = (row[1] if len(row) > 1 else "").partition("=")
                dist.entries.append(Entry(row[0], digest if algo == "sha256" and digest else None))
        dists.append(dist)
    return sorted(dists, key=lambda d: d.name.lower())


def file_digest(path: Path) -> str:
    """RECORD's form of a file's sha256: urlsafe base64 without padding (PEP 376)."""
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return base64.urlsafe_b64encode(h.digest()).rstrip(b"=").decode("ascii")


def check_site(site: Path) -> tuple[list[Distribution], int, list[Problem]]:
    """Compare every hashed RECORD entry of every distribution in ``site`` with the file on disk.

    Args:
        site: a site-packages folder.

    Returns:
        The distributions read, the number of files checked, and the problems found (in the
        order of the distributions, then of their RECORD).
    """
    dists = read_distributions(site)
    owners: dict[str, list[tuple[Distribution, Entry]]] = {}
    for dist in dists:
        for entry in dist.entries:
            owners.setdefault(os.path.normpath(site / entry.path), []).append((dist, entry))
    digests: dict[str, str | None] = {}  # a file listed by several wheels is hashed once
    checked, problems = 0, []
    for dist in dists:
        for entry in dist.entries:
            if entry.digest is None:
                continue
            full = os.path.normpath(site / entry.path)
            if full not in digests:
                digests[full] = file_digest(Path(full)) if os.path.isfile(full) else None
            checked += 1
            actual = digests[full]
            if actual == entry.digest:
                continue
            others = [(d, e) for d, e in owners[full] if d is not dist]
            holder = next((d.label for d, e in others if actual is not None and e.digest == actual), None)
            problems.append(Problem(dist.label, entry.path, "missing" if actual is None else "differs",
                                    tuple(d.label for d, _ in others), holder))
    return dists, checked, problems


def report(site: Path, dists: list[Distribution], checked: int, problems: list[Problem]) -> list[str]:
    """The lines the command prints: one summary, then the problems grouped by distribution."""
    if not problems:
        return [f"check_wheels: {site}: {checked} files of {len(dists)} distributions match their RECORD"]
    lines = [f"check_wheels: {site}: {len(problems)} of {checked} files do not match their RECORD "
             f"(an install overwrote or removed another wheel's files):"]
    by_dist: dict[str, list[Problem]] = {}
    for p in problems:
        by_dist.setdefault(p.dist, []).append(p)
    for dist, found in by_dist.items():
        clobberers = sorted({o for p in found for o in p.also_listed_by})
        who = f"; the same paths are also installed by {', '.join(clobberers)}" if clobberers else ""
        lines.append(f"  {dist}: {len(found)} file(s){who}")
        for p in found:
            if p.now_holds:
                state = f"holds {p.now_holds}'s copy"
            elif p.kind == "missing":
                state = "missing"
            else:
                state = "differs"
            lines.append(f"    {p.path}: {state}")
    return lines


def default_site() -> Path:
    """The running interpreter's site-packages (``purelib``; a venv's own)."""
    return Path(sysconfig.get_paths()["purelib"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("site", nargs="?", type=Path, default=None,
                        help="site-packages folder (default: this interpreter's)")
    args = parser.parse_args(argv)
    site = args.site or default_site()
    if not site.is_dir() or not any(site.glob("*.dist-info")):
        print(f"check_wheels: {site}: not a site-packages folder (expected *.dist-info folders)", file=sys.stderr)
        return 2
    dists, checked, problems = check_site(site)
    for line in report(site, dists, checked, problems):
        print(line)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())

"""The kinds of bone map the project reads and TotalSegmentator's ids in the project's bone codes,
as plain data (no imaging import), so ``cli.py`` can offer ``--bones-from`` from here without
paying for the image readers; :func:`analysis.cohort.imports.bones_from` reads the maps.
"""
from __future__ import annotations

__all__ = ["PROJECT", "TOTALSEGMENTATOR", "BONE_MAP_KINDS", "TOTALSEG_TO_BONE"]

#: A bone map in the cohort's own codes (``bonesTr``, :data:`analysis.cohort.layout.BONE_CODES`).
PROJECT = "project"
#: A TotalSegmentator v2 multilabel map of its "total" task.
TOTALSEGMENTATOR = "totalsegmentator"
#: What a bone map holds (``--bones-from``, ``bones_from(kind=...)``).
BONE_MAP_KINDS: tuple[str, ...] = (PROJECT, TOTALSEGMENTATOR)

# TotalSegmentator v2, task "total" class ids -> bonesTr codes (see analysis.cohort.layout.BONE_CODES).
# Ids from TotalSegmentator's class map (map_to_binary.py, "total" task, v2):
# sacrum 25; vertebrae S1..C1 26-50; humerus 69/70; scapula 71/72; clavicula 73/74;
# femur 75/76; hip 77/78; skull 91; ribs 92-115; sternum 116; costal cartilages 117.
TOTALSEG_TO_BONE: dict[int, int] = {25: 4}
TOTALSEG_TO_BONE.update({i: 2 for i in range(26, 51)})
TOTALSEG_TO_BONE.update({i: 5 for i in range(69, 75)})
TOTALSEG_TO_BONE.update({75: 6, 76: 6, 77: 4, 78: 4, 91: 1})
TOTALSEG_TO_BONE.update({i: 3 for i in range(92, 116)})
TOTALSEG_TO_BONE.update({116: 7, 117: 7})

"""Lesions room: the domain primitives every room above compares lesions with.

* :mod:`.instances`: lesion instances (3D connected components) and their attributes (extent,
  volume, neighbours, bone identity, diffuse versus focal);
* :mod:`.overlap`: Dice, precision and recall with their one rule for empty masks, the pairs of
  lesions that share voxels and the matching of predicted to ground-truth lesions;
* :mod:`.change`: the follow-up statuses (one vocabulary), the change rule and the grouping of
  matched lesions (splits and merges).

Imports from :mod:`analysis.imaging` and the floor only. The public names of the three modules
are importable from here (``from analysis.lesions import lesion_instances``).
"""
from __future__ import annotations

from analysis.lesions.change import *  # noqa: F401,F403
from analysis.lesions.change import __all__ as _change
from analysis.lesions.instances import *  # noqa: F401,F403
from analysis.lesions.instances import __all__ as _instances
from analysis.lesions.overlap import *  # noqa: F401,F403
from analysis.lesions.overlap import __all__ as _overlap

__all__ = [*_instances, *_overlap, *_change]

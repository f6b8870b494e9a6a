"""Metric families, one module each: pixel overlap (:mod:`.overlap`), lesion instances
and their attributes (:mod:`.lesions`), the paper's clinical lesion tasks
(:mod:`.clinical`) and slice-level detection (:mod:`.detection`).

All metrics are pure functions over numpy arrays; file reading happens in
:mod:`analysis.analyze`.
"""

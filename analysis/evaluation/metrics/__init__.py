"""Metric families, one module each: pixel overlap (:mod:`.overlap`), lesion-wise matching
(:mod:`.lesionwise`), FROC (:mod:`.froc`), the paper's clinical lesion tasks
(:mod:`.clinical`) and slice-level detection (:mod:`.detection`). Lesion instances and their
attributes are :mod:`analysis.lesions`.

All metrics are pure functions over numpy arrays; file reading happens in
:mod:`analysis.evaluation.analyze`.
"""

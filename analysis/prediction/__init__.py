"""Prediction room: what both model wings share when they run a model on CT.

The PRED folder contract (:mod:`.folder`), the prediction request both commands build
(:mod:`.request`), the case runner (:mod:`.runner`), shards, probability maps, previews
and the lesion and patient tables (:mod:`.tables`).

Imports from :mod:`analysis.cohort`, :mod:`analysis.lesions`, :mod:`analysis.imaging` and
the floor only; never from :mod:`analysis.evaluation`.
"""

"""Cohort room: the cohort folder layout (:mod:`.layout`), reading one case (:mod:`.case`),
splits, validation, imports (NIfTI, DICOM, bone maps), the CT phantom and example inputs.

Imports from :mod:`analysis.imaging`, :mod:`analysis.lesions` and the floor only.
"""

"""Monitoring: two CTs of one patient compared lesion by lesion (rigid registration, matching,
status, the follow-up outputs and their DICOM SEG and TID 1500 report). Sits beside
:mod:`analysis.evaluation` at the top of the core; it may import imaging, lesions, cohort and
prediction."""

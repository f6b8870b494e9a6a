"""Framework-neutral core of bonemets. Importing it imports neither TensorFlow nor torch.

Rooms, bottom to top; each imports only from the rooms below it (``tests/test_architecture.py``
proves the order):

* :mod:`analysis.errors`, :mod:`analysis.resources`: the floor (error types, memory checks);
* :mod:`analysis.imaging`: file formats (images, DICOM, JSON, the one CSV format and
  ``versions()`` in :mod:`analysis.imaging.records`) read and written, orientation, the body crop,
  input discovery, the display window, DICOM-SEG and TID 1500 SR writing, DICOM-SEG and
  RTSTRUCT labels;
* :mod:`analysis.lesions`: lesion instances and their attributes (bone identity, diffuse,
  neighbours), how two masks or two sets of lesions overlap (the one Dice and its rule for empty
  masks, the one pairing of overlapping lesions) and how a lesion changed (the one vocabulary of
  follow-up statuses): the domain primitives of everything above;
* :mod:`analysis.cohort`: the cohort layout, reading one case, splits, validation and its
  quality-control report, imports (one case or a whole DICOM export), the phantom and its
  follow-up scans, examples;
* :mod:`analysis.prediction`: the PRED folder contract, the prediction request, the case
  runner, shards, probability maps, previews, the lesion and patient tables;
* :mod:`analysis.evaluation`: metrics, statistics, bootstrap, radiomics, ``analyze``, the
  report and the paper's values;
* :mod:`analysis.monitoring` (beside evaluation): two scans of one patient compared lesion by
  lesion (rigid registration, matching, status, the ``followup`` outputs);
* :mod:`analysis.node` (beside evaluation): the DICOM node of ``serve`` (spool, delivery, the
  storage SCP), calling a wing's prediction on each complete series;
* :mod:`analysis.review` (beside evaluation): the reader's review of ``review`` (decisions
  journal, sign-in, the web application, signing and delivering the final SEG and report).
"""
from __future__ import annotations

__version__ = "0.1.0"

"""Framework-neutral core of bonemets: cohort I/O and validation, the CT phantom,
metrics, clinical lesion tasks, statistics, radiomics and reports.

Importing this package imports neither TensorFlow nor torch.
"""
from __future__ import annotations

__version__ = "0.1.0"

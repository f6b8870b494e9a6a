"""The DICOM node (``python cli.py serve``): CT in from a PACS, SEG and a TID 1500 report back.

A room above :mod:`analysis.prediction`, framework-neutral: the node calls a
``predict_series(series_dir, out_dir)`` callable that the command line builds for one wing
(Keras or nnU-Net), the same prediction as ``predict --images series_dir --out out_dir``.

- :mod:`analysis.node.spool`: the spool, a journal on disk (received instances, jobs,
  results, delivered/undelivered/failed) whose every step is one atomic rename;
- :mod:`analysis.node.deliver`: sending results by C-STORE (pynetdicom) or STOW-RS
  (dicomweb-client);
- :mod:`analysis.node.server`: the storage SCP and the loop that completes series,
  predicts them and delivers the results with bounded, growing back-off.
"""

"""The reader's review (``python cli.py review``): accept or reject each predicted lesion in a
browser, add the ones the model missed, sign; the final SEG and verified report go to the PACS.

A room beside :mod:`analysis.node` (the top room), framework-neutral (no TensorFlow, no torch):

- :mod:`analysis.review.journal`: every decision, written when made (per-study journals and
  ``reviews.csv``); the decision record's schema, declared once; importable by the node;
- :mod:`analysis.review.auth`: readers and salted password hashes, sessions, the sign-in slow-down;
- :mod:`analysis.review.store`: the studies of a spool or of PRED folders and their CT;
- :mod:`analysis.review.views`: the pictures (lesion cards, axial slices);
- :mod:`analysis.review.growing`: a missed lesion grown from a click (the rule);
- :mod:`analysis.review.signing`: the final SEG and verified report, and their outbox;
- :mod:`analysis.review.service`: decisions, additions and signatures, checked under the journal's lock;
- :mod:`analysis.review.app`: the Flask application (pages, JSON API, sign-in, CSRF);
- :mod:`analysis.review.server`: serving it with waitress, and delivering signed studies;
- :mod:`analysis.review.viewer`: a viewer's edited SEG received by the node, compared lesion by
  lesion with the prediction, as review decisions (source ``viewer``);
- :mod:`analysis.review.import_reviews`: ``import-reviews``: reviewed studies become cohort cases
  with hard negatives.
"""

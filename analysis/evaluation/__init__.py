"""Evaluation room: metrics (:mod:`.metrics`), statistics, bootstrap, radiomics, ``analyze``
(:mod:`.analyze`), the report and the paper's values. The top room: it may import every
room below it.
"""

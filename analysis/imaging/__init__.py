"""Imaging room: reading and writing images and DICOM, the canonical orientation, the body
crop, discovery of new patients' inputs, DICOM-SEG output and display constants.

Imports only :mod:`analysis.errors` and :mod:`analysis.resources` from the core.
"""

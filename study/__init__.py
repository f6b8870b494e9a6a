"""Whole-study orchestration above the three packages: the demo and its report.

Every stage calls one library function (:mod:`study.stages`), never the command line; the
stages of one framework (Keras training, nnU-Net, Keras inference) run in a process of their
own (:mod:`study.batch`), so TensorFlow and PyTorch never share one.
"""

"""Whole-study orchestration above the three packages: the demo and its report.

It starts every framework stage (Keras, nnU-Net) as its own process through
``python cli.py ...`` so TensorFlow and PyTorch never share one.
"""

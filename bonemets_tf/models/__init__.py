"""Model registry and one module per model family.

``catalog`` lists names and tasks as plain data (no TensorFlow import, used by the CLI);
``registry`` maps the same names to builders (imports TensorFlow).
"""

"""Export a trained model as a TensorFlow SavedModel that needs no project code to run.

Signature ``serving_default``:

* input ``ct_hu``: float32 ``[batch, rows, cols, context]``, raw Hounsfield units, any
  rows and cols (``context`` adjacent axial slices as channels, centre in the middle);
* output ``lesion_probability``: float32 ``[batch, rows, cols]`` for segmenters,
  ``[batch]`` for detectors.

Windowing, padding to the segmenter's stride with cropping back, and the detectors'
resize to their training size are layers of the Keras graph (:mod:`bonemets_tf.layers`),
so they are traced into the exported ``tf.function``. The RUN's ``config.json`` plus an
``export`` summary travel as the asset ``assets/bonemets_config.json``. The SavedModel is
written to a temporary sibling and renamed into place.

Load it anywhere with::

    fn = tf.saved_model.load(path).signatures["serving_default"]
    fn(ct_hu=tf.constant(x))["lesion_probability"]
"""
from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path

from analysis.errors import InputError
from analysis.imaging.io import atomic_directory, check_output_folder
from bonemets_tf.models.catalog import DETECT
from bonemets_tf.run import CONFIG_ASSET, read_run

log = logging.getLogger(__name__)

SIGNATURE = "serving_default"
INPUT_NAME = "ct_hu"
OUTPUT_NAME = "lesion_probability"


def export_savedmodel(model: str | os.PathLike, out: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Write RUN ``model`` as a SavedModel at ``out`` (signature in the module docstring).

    Args:
        model: RUN folder from ``train``.
        out: SavedModel folder to create.
        overwrite: replace an existing non-empty ``out``.

    Returns:
        ``out``.

    Raises:
        InputError: not a RUN folder, an unloadable model, or an existing ``out``
            without ``overwrite``.
    """
    run = read_run(model)
    out = Path(out)
    check_output_folder(out, overwrite=overwrite)  # before the slow TensorFlow import

    import tensorflow as tf

    keras_model = run.load_model()
    detector = run.task == DETECT
    with tempfile.TemporaryDirectory(prefix="bonemets-export-") as scratch, \
            atomic_directory(out, overwrite=overwrite) as tmp:
        config_file = Path(scratch) / CONFIG_ASSET
        config_file.write_text(json.dumps({**run.config, "export": {
            "source_run": str(run.path), "arch": run.arch, "task": run.task, "signature": SIGNATURE,
            "input": {INPUT_NAME: f"float32 [batch, rows, cols, {run.context}] raw HU, any rows/cols"},
            "output": {OUTPUT_NAME: "float32 [batch]" if detector else "float32 [batch, rows, cols]"},
            "tensorflow": tf.__version__}}, indent=2) + "\n", encoding="utf-8")

        module = tf.Module()
        module.model = keras_model
        module.config = tf.saved_model.Asset(str(config_file))  # copied to assets/ by save

        @tf.function(input_signature=[tf.TensorSpec([None, None, None, run.context], tf.float32, name=INPUT_NAME)])
        def serve(ct_hu):
            probability = keras_model(ct_hu, training=False)
            probability = probability[:, 0] if detector else probability[..., 0]
            return {OUTPUT_NAME: tf.cast(probability, tf.float32)}

        module.serve = serve
        try:
            serve.get_concrete_function()
        except Exception as exc:  # a layer that needs static rows/cols (e.g. bilinear UpSampling2D)
            raise InputError(f"{run.model_path}: {run.arch} cannot be traced for any rows/cols "
                             f"({type(exc).__name__} in the model graph); it cannot be exported yet") from None
        tf.saved_model.save(module, str(tmp), signatures={SIGNATURE: serve})
    log.info("exported %s (%s) to %s", run.arch, run.task, out)
    return out

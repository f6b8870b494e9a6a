"""Grad-CAM and Grad-CAM++ heat maps of a slice-level detector, like the paper's Fig. 2.

For each case the detector scores every slice; the ``max_slices`` most confident slices
get a class activation map of the last convolutional feature map (the last layer with a
4D output before the global pooling). The score is the detector's logit, i.e. the
sigmoid output with its activation replaced by the identity, which avoids the vanishing
gradients of a saturated sigmoid.

Two implementations give the same maps: tf-keras-vis (``Gradcam`` / ``GradcamPlusPlus``
with ``ReplaceToLinear``), used when it works on the model, and :func:`tape_cam`, a plain
``tf.GradientTape`` version used otherwise. Grad-CAM: Selvaraju et al. 2017
(arXiv 1610.02391); Grad-CAM++: Chattopadhay et al. 2018 (arXiv 1710.11063), following
tf-keras-vis 0.8.7's formulation. Maps are upsampled bilinearly to the slice's rows and
cols and min-max normalised to [0, 1] per slice.

Outputs in ``DIR`` (built in a temporary sibling and renamed into place):

* ``<case>_z<slice>.png``: the CT slice in the display bone window (L 500 / W 2000), the heat map
  (jet, semi-transparent) and the ground-truth outline when the case has lesion there;
* ``<case>_gradcam.nii.gz``: float32 heat-map volume with the CT's geometry (slices
  without a map are 0);
* ``gradcam.csv``: ``case,slice,probability,png``.
"""
from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import SimpleITK as sitk

from analysis.cohort.layout import Cohort
from analysis.errors import DataProblems, InputError
from analysis.imaging.display import BONE_WINDOW, window
from analysis.imaging.inputs import read_input
from analysis.imaging.io import (Geometry, atomic_directory, atomic_write_json, atomic_write_text, check_output_folder,
                                 read_array, require_finite, write_array)
from analysis.imaging.orientation import CANONICAL, Reorientation
from analysis.imaging.hounsfield import require_ct
from analysis.imaging.resample import resample_in_plane
from analysis.prediction.runner import network_grid, plan_inputs, to_network_grid
from analysis.imaging.records import csv_text
from bonemets_tf.choices import GRADCAM_METHODS
from bonemets_tf.models.catalog import DETECT
from bonemets_tf.run import read_run

log = logging.getLogger(__name__)

CSV_NAME = "gradcam.csv"


def last_conv_layer(model) -> str:
    """Name of the last layer with a 4D output before the model's global pooling.

    Raises:
        ValueError: the model has no 4D layer before a global pooling layer.
    """
    import keras

    layers = model.layers
    pools = [i for i, layer in enumerate(layers)
             if isinstance(layer, (keras.layers.GlobalAveragePooling2D, keras.layers.GlobalMaxPooling2D))]
    end = pools[-1] if pools else len(layers)
    for layer in reversed(layers[:end]):
        if len(layer.output.shape) == 4:
            return layer.name
    raise ValueError(f"{model.name}: no layer with a 4D output before the global pooling")


def _logit_model(model, layer_name: str):
    """``x -> (feature map, logit, probability)``; the logit is the sigmoid's input."""
    import keras

    return keras.Model(model.inputs, [model.get_layer(layer_name).output, model.layers[-1].input, model.output])


def _expand(cams, rows: int, cols: int) -> np.ndarray:
    import tensorflow as tf

    cams = tf.image.resize(tf.convert_to_tensor(cams, tf.float32)[..., None], (rows, cols), method="bilinear")[..., 0]
    return normalize(cams.numpy())


def normalize(cams: np.ndarray) -> np.ndarray:
    """Min-max scale each map of ``(B, rows, cols)`` to [0, 1] (a constant map becomes 0)."""
    cams = np.asarray(cams, np.float32)
    low = cams.min(axis=(1, 2), keepdims=True)
    span = cams.max(axis=(1, 2), keepdims=True) - low
    return np.where(span > 0, (cams - low) / np.where(span > 0, span, 1.0), 0.0).astype(np.float32)


def tape_cam(model, images: np.ndarray, *, method: str = "gradcam", layer: str | None = None) -> np.ndarray:
    """Grad-CAM / Grad-CAM++ with ``tf.GradientTape`` (no tf-keras-vis).

    Args:
        model: a detector ``(B, rows, cols, context) HU -> (B, 1)`` ending in a sigmoid.
        images: ``(B, rows, cols, context)`` float32 HU.
        method: ``"gradcam"`` or ``"gradcam++"``.
        layer: feature layer (None: :func:`last_conv_layer`).

    Returns:
        ``(B, rows, cols)`` float32 maps in [0, 1].
    """
    import tensorflow as tf

    sub = _logit_model(model, layer or last_conv_layer(model))
    x = tf.convert_to_tensor(images, tf.float32)
    with tf.GradientTape() as tape:
        features, logit, _ = sub(x, training=False)
        score = logit[:, 0]
    grads = tape.gradient(score, features)
    if method == "gradcam":
        weights = tf.reduce_mean(grads, axis=(1, 2), keepdims=True)
    else:  # Chattopadhay et al. 2018, as tf-keras-vis computes it (score = exp(logit))
        first = tf.exp(score)[:, None, None, None] * grads
        second, third = first * grads, first * grads * grads
        total = tf.reduce_sum(features, axis=(1, 2), keepdims=True)
        denom = 2.0 * second + third * total
        alphas = second / (denom + tf.cast(second == 0.0, denom.dtype))
        norm = tf.reduce_sum(alphas, axis=(1, 2), keepdims=True)
        alphas = alphas / (norm + tf.cast(norm == 0.0, norm.dtype))
        weights = tf.reduce_sum(tf.nn.relu(first) * alphas, axis=(1, 2), keepdims=True)
    cams = tf.nn.relu(tf.reduce_sum(weights * features, axis=-1))
    return _expand(cams, images.shape[1], images.shape[2])


def vis_cam(model, images: np.ndarray, *, method: str = "gradcam", layer: str | None = None) -> np.ndarray:
    """Grad-CAM / Grad-CAM++ with tf-keras-vis (same arguments and result as :func:`tape_cam`).

    Raises:
        Exception: whatever tf-keras-vis raises on a model it cannot handle.
    """
    from tf_keras_vis.gradcam import Gradcam
    from tf_keras_vis.gradcam_plus_plus import GradcamPlusPlus
    from tf_keras_vis.utils.model_modifiers import ReplaceToLinear

    cls = Gradcam if method == "gradcam" else GradcamPlusPlus
    explainer = cls(model, model_modifier=ReplaceToLinear(), clone=True)
    cams = explainer(lambda output: output[:, 0], np.asarray(images, np.float32),
                     penultimate_layer=layer or last_conv_layer(model), seek_penultimate_conv_layer=False,
                     expand_cam=False, normalize_cam=False)
    return _expand(np.asarray(cams), images.shape[1], images.shape[2])


def class_activation_maps(model, images: np.ndarray, *, method: str = "gradcam",
                          backend: str = "auto") -> tuple[np.ndarray, str]:
    """Heat maps of ``images`` by tf-keras-vis, falling back to :func:`tape_cam`.

    Args:
        model: a flat functional detector.
        images: ``(B, rows, cols, context)`` float32 HU.
        method: ``"gradcam"`` or ``"gradcam++"``.
        backend: ``"auto"``, ``"tf-keras-vis"`` or ``"tape"``.

    Returns:
        ``(maps (B, rows, cols) in [0, 1], backend used)``.
    """
    if backend in ("auto", "tf-keras-vis"):
        try:
            return vis_cam(model, images, method=method), "tf-keras-vis"
        except Exception as exc:  # tf-keras-vis fails on some graphs (e.g. nested backbones)
            if backend != "auto":
                raise
            log.warning("tf-keras-vis failed on %s (%s); using the GradientTape implementation",
                        model.name, str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__)
    return tape_cam(model, images, method=method), "tape"


def overlay_png(ct_slice: np.ndarray, cam: np.ndarray, label_slice: np.ndarray | None, path: Path, *,
                aspect: float = 1.0, title: str = "") -> None:
    """Write one Fig. 2-style overlay: CT in a bone window, heat map, lesion outline.

    Args:
        ct_slice: ``(rows, cols)`` HU.
        cam: ``(rows, cols)`` heat map in [0, 1].
        label_slice: ``(rows, cols)`` 0/1 ground truth, or None.
        path: PNG to write.
        aspect: row spacing / col spacing (so pixels have their physical shape).
        title: figure title.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows, cols = ct_slice.shape
    fig = Figure(figsize=(5.0, 5.0 * rows * aspect / cols + 0.4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_axes((0, 0, 1, 1 - 0.4 / fig.get_figheight()))
    ax.imshow(window(ct_slice), cmap="gray", vmin=0.0, vmax=1.0, aspect=aspect, interpolation="nearest")
    ax.imshow(cam, cmap="jet", alpha=0.4, vmin=0.0, vmax=1.0, aspect=aspect, interpolation="bilinear")
    if label_slice is not None and label_slice.any():
        ax.contour(label_slice.astype(float), levels=[0.5], colors=["lime"], linewidths=1.0)
    ax.set_axis_off()
    fig.suptitle(title, fontsize=9, y=1 - 0.05 / fig.get_figheight())
    fig.savefig(path, format="png")


def gradcam(model: str | os.PathLike, dataset: str | os.PathLike | None, out: str | os.PathLike, *,
            cases: str = "test", max_slices: int = 4, method: str = "gradcam", batch_size: int = 8,
            overwrite: bool = False, images: str | os.PathLike | None = None, ct_check: bool = True) -> Path:
    """Write Grad-CAM overlays, heat-map volumes and ``gradcam.csv`` for a detector RUN.

    The detector sees each CT in the canonical orientation it was trained in (LPS,
    :mod:`analysis.imaging.orientation`), so the overlays are drawn in radiological convention
    (anterior up, the patient's right on the viewer's left) whatever the file's storage;
    slice numbers (file names, ``gradcam.csv``) are the stored file's axis-0 indices, and
    the heat-map volumes have each input's exact geometry. As in ``predict``, the detector runs on
    slices resampled in-plane to the pixel spacing it was trained at
    (:func:`analysis.prediction.runner.network_grid`); its maps come back onto the input's grid
    linearly.

    Args:
        model: a detector RUN folder.
        dataset: cohort folder (None with ``images``).
        out: output folder (layout in the module docstring).
        cases: ``--cases`` value (cohort input).
        max_slices: maps per case, for its most confident slices.
        method: ``"gradcam"`` or ``"gradcam++"``.
        batch_size: slices per network call.
        overwrite: replace a non-empty ``out``.
        images: ``--images`` PATH (:mod:`analysis.imaging.inputs`) instead of a cohort (no outlines then).
        ct_check: refuse a case that does not look like CT in HU (``--no-ct-check``).

    Returns:
        ``out``.

    Raises:
        InputError: not a detector RUN, bad cases or CT files, bad options, or a
            non-empty ``out`` without ``overwrite``.
    """
    run = read_run(model, task=DETECT)
    if method not in GRADCAM_METHODS:
        raise InputError(f"--method {method!r}: expected one of {', '.join(GRADCAM_METHODS)}")
    if max_slices < 1 or batch_size < 1:
        raise InputError(f"--max-slices {max_slices} / --batch-size {batch_size}: expected >= 1")
    out = Path(out)
    check_output_folder(out, overwrite=overwrite)
    plan = plan_inputs(dataset, images, cases=cases)
    if plan.failures:
        raise DataProblems(plan.failures)
    labels = {}
    if dataset is not None:
        cohort = Cohort(dataset)
        labels = {c.case_id: cohort.label_path(c.case_id) for c in plan.cases if cohort.label_path(c.case_id).is_file()}

    from tqdm import tqdm

    from bonemets_tf.inference import Predictor, context_batch, detect_volume

    predictor = Predictor(run)
    trained_xy, source = run.training_spacing()
    if trained_xy is None:
        log.warning("gradcam: %s: training pixel spacing %s; running at each input's own spacing", run.path, source)
    rows: list[tuple[str, int, float, str]] = []
    backends: set[str] = set()
    with atomic_directory(out, overwrite=overwrite) as tmp:
        for source in tqdm(plan.cases, desc="gradcam", unit="case", file=sys.stderr, disable=None):
            case = source.case_id
            image, _ = read_input(source)
            geometry = Geometry.of(image)
            reo = Reorientation.of(geometry)
            if reo.perm[2] != 2:
                raise InputError(f"{source.describe()}: stored with axis 0 not head-to-feet; Grad-CAM of a slice "
                                 f"detector needs axial slices along the file's third index")
            native = sitk.GetArrayFromImage(image)
            require_finite(source.path, native, where=source.describe())  # predict's check of a CT
            require_ct(native, source.describe(), check=ct_check)           # and its "is it CT?"
            native = native.astype(np.float32, copy=False)
            volume = np.ascontiguousarray(reo.forward(native))
            label = np.ascontiguousarray(reo.forward(read_array(labels[case])[0])) if case in labels else None
            spacing_zyx = reo.canonical_spacing_zyx
            grid = network_grid(volume.shape, spacing_zyx, trained_xy)
            seen = to_network_grid(volume, grid)
            probs = detect_volume(predictor, seen, batch_size)
            top = np.sort(np.argsort(-probs, kind="stable")[:max_slices])
            heat = np.zeros(volume.shape, np.float32)
            for start in range(0, len(top), batch_size):
                z = top[start:start + batch_size]
                maps, used = class_activation_maps(predictor.model, context_batch(seen, z, run.context), method=method)
                backends.add(used)
                heat[z] = resample_in_plane(maps, volume.shape[1:]) if grid.resampled else maps
            del seen
            aspect = spacing_zyx[1] / spacing_zyx[2]
            for z in top:
                stored = int(reo.stored_slices(z))  # the file's own slice number
                png = f"{case}_z{stored:04d}.png"
                overlay_png(volume[z], heat[z], None if label is None else label[z], tmp / png, aspect=aspect,
                            title=f"{case} slice {stored}  p={probs[z]:.3f}  {run.arch} {method}")
                rows.append((case, stored, float(probs[z]), png))
            write_array(np.ascontiguousarray(reo.backward(heat)), geometry, tmp / f"{case}_gradcam.nii.gz")
        atomic_write_text(tmp / CSV_NAME, _csv(rows))
        atomic_write_json(tmp / "gradcam.json", _record(run, plan, max_slices, method, backends))
    log.info("gradcam: %d overlays for %d case(s) in %s", len(rows), len(plan.cases), out)
    return out


def _csv(rows: Sequence[tuple[str, int, float, str]]) -> str:
    return csv_text(("case", "slice", "probability", "png"), rows, digits=6)


def _record(run, plan, max_slices: int, method: str, backends: set[str]) -> dict[str, Any]:
    return {"model": run.describe(), **plan.describe(""), "cases": [c.case_id for c in plan.cases],
            "orientation": CANONICAL, "display": "radiological (anterior up, patient's right on the viewer's left)",
            "max_slices": max_slices, "method": method, "implementation": sorted(backends),
            "score": "detector logit (sigmoid replaced by identity)",
            "display_window_hu": {"level": BONE_WINDOW[0], "width": BONE_WINDOW[1]}}

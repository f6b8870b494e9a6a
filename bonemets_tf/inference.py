"""The one slice-batching inference engine of the Keras wing.

``predict``, the threshold calibration after ``train``, ``gradcam`` and the benchmarks all
run a model over CT slices through this module, so the context-slice rule, batching,
padding and thresholds are defined once.

Slices go through the network at full resolution in batches, each as ``(rows, cols,
context)`` raw HU with the ``context`` neighbours that training used (centre slice in the
middle, edge slices repeated; :func:`context_indices` is the same rule as
:class:`bonemets_tf.data.SliceStore`). Padding rows/cols to the segmenter's stride and
cropping back happens inside the model (``PadToMultiple``/``CropLike``, padding with the
bottom of the HU window, i.e. air); detectors resize to their training ``image_size``
inside the model, the same bilinear resize the training pipeline applies.
"""
from __future__ import annotations

import logging
import math
from typing import Sequence

import numpy as np

from bonemets_tf.choices import PREDICT_PRECISIONS
from bonemets_tf.models.catalog import DETECT, SEGMENT
from bonemets_tf.run import RunInfo

log = logging.getLogger(__name__)

#: Rough float32 activation channels alive at once per input pixel, in units of the
#: network's first-layer filters (skip tensors, decoder concatenations, BatchNorm
#: temporaries). Only used to refuse volumes that obviously cannot fit in memory.
ACTIVATION_FACTOR = 8


def context_indices(z: np.ndarray | int, n_slices: int, context: int) -> np.ndarray:
    """Slice indices feeding centre slice(s) ``z``: ``z - context//2 .. z + context//2``,
    clamped to ``0 .. n_slices - 1`` (edge slices repeat), as in training.

    Returns:
        ``(len(z), context)`` int64 (``(context,)`` for a scalar ``z``).
    """
    offsets = np.arange(context, dtype=np.int64) - context // 2
    return np.clip(np.asarray(z, np.int64)[..., None] + offsets, 0, n_slices - 1)


def context_batch(volume: np.ndarray, z: Sequence[int], context: int) -> np.ndarray:
    """Network input for centre slices ``z`` of ``volume``.

    Args:
        volume: CT in HU, ``(slices, rows, cols)``.
        z: centre slice indices.
        context: slices per input (odd).

    Returns:
        ``(len(z), rows, cols, context)`` float32 HU.
    """
    idx = context_indices(np.asarray(z), volume.shape[0], context)
    return np.ascontiguousarray(np.moveaxis(volume[idx], 1, -1), dtype=np.float32)


def _with_policy(model, policy: str):
    """A copy of ``model`` whose every layer computes under dtype ``policy``, with its weights."""
    import keras

    def clone(layer):
        config = layer.get_config()
        config["dtype"] = policy
        return layer.__class__.from_config(config)

    copy = keras.models.clone_model(model, clone_function=clone)
    copy.set_weights(model.get_weights())
    return copy


class Predictor:
    """A loaded model behind one ``tf.function`` for any batch, rows and cols.

    One input signature ``(None, None, None, context)`` means one trace for every batch
    and slice size (``predict_on_batch`` would retrace per shape). A SavedModel written by
    ``export`` runs through its ``serving_default`` signature (the form teams deploy).

    Args:
        run: the model's RUN (or SavedModel, ``run.kind == "savedmodel"``).
        model: the loaded ``keras.Model`` (None: load it from ``run``).
        precision: one of :data:`bonemets_tf.choices.PREDICT_PRECISIONS` (RUN folders only).
    """

    def __init__(self, run: RunInfo, model=None, precision: str = "float32") -> None:
        import tensorflow as tf

        from analysis.errors import InputError

        if precision not in PREDICT_PRECISIONS:
            raise InputError(f"--precision {precision}: expected one of {', '.join(PREDICT_PRECISIONS)}")
        self.run = run
        self.precision = precision
        if run.kind == "savedmodel":
            if precision != "float32":
                raise InputError(f"--precision {precision}: a SavedModel runs as exported (float32); "
                                 f"pass its RUN folder for {precision}")
            self.model = None
            try:
                signature = tf.saved_model.load(str(run.path)).signatures["serving_default"]
            except Exception as exc:  # TF raises many types for damaged SavedModels
                first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
                raise InputError(f"{run.path}: cannot be loaded as a SavedModel ({first})") from None
            self._fn = lambda x: signature(ct_hu=tf.constant(x))["lesion_probability"]
            return
        self.model = model if model is not None else run.load_model()
        if precision != "float32":
            self.model = _with_policy(self.model, precision)
        self._fn = tf.function(lambda x: self.model(x, training=False),
                               input_signature=[tf.TensorSpec([None, None, None, run.context], tf.float32)])
        try:
            self._fn.get_concrete_function()
        except Exception as exc:  # a layer that needs static rows/cols (e.g. bilinear UpSampling2D)
            log.warning("%s does not trace with unknown rows/cols (%s); tracing per slice size instead",
                        run.arch, type(exc).__name__)
            # exact shapes: reduce_retracing would relax rows/cols to None on the second shape
            # and hit the same error (found by benchmarks/run.py: warm-up 32^2, then 512^2)
            self._fn = tf.function(lambda x: self.model(x, training=False))

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        """Probabilities for ``batch`` ``(B, rows, cols, context)`` HU: ``(B,)`` for a
        detector, ``(B, rows, cols)`` for a segmenter (float32)."""
        out = np.asarray(self._fn(batch), np.float32)
        if self.model is None:  # the SavedModel's signature already gives (B,) / (B, rows, cols)
            return out
        return out[:, 0] if self.run.task == DETECT else out[..., 0]

    def warm_up(self) -> None:
        """Trace the function once on a small batch, so timings measure steady-state inference."""
        self._fn(np.zeros((1, 32, 32, self.run.context), np.float32))

    def count_params(self) -> int:
        """Weights of the network (the RUN's record for a SavedModel)."""
        if self.model is None:
            return int(self.run.config.get("model", {}).get("params") or 0)
        return int(self.model.count_params())

    def first_filters(self) -> int:
        """Filters of the model's first convolution (a scale for memory estimates)."""
        import keras

        if self.model is None:
            return 64
        for layer in self.model.layers:
            if isinstance(layer, keras.layers.Conv2D):
                return int(layer.filters)
        return 64


#: ``(left, right, jump)``: an output at input position ``x`` depends on inputs in
#: ``[x - left, x + right]``; ``jump`` input pixels lie between neighbouring outputs.
Reach = tuple[float, float, float]


def _conv_reach(k: int, s: int, d: int, reach: Reach) -> Reach:
    """A 'same' convolution (TensorFlow pads ``total = (k - 1) d + 1 - s`` for a size divisible
    by ``s``, the smaller half before); 'valid' and odd splits are covered by the same bound."""
    left, right, jump = reach
    total = max((k - 1) * d + 1 - s, 0)
    before = total // 2
    return left + before * jump, right + ((k - 1) * d - before) * jump, jump * s


def _spatial_step(layer, reaches: list[Reach]) -> Reach | None:
    """How one layer grows the reach of its inputs; None for a layer whose reach is unknown."""
    import keras

    left = max(r[0] for r in reaches)
    right = max(r[1] for r in reaches)
    jump = reaches[0][2]
    name = type(layer).__name__
    if isinstance(layer, keras.layers.Conv2DTranspose):  # each output takes k taps of the input below it
        k, s = max(layer.kernel_size), max(layer.strides)
        return left + k * jump, right + k * jump, jump / s
    if isinstance(layer, (keras.layers.Conv2D, keras.layers.DepthwiseConv2D)):
        return _conv_reach(max(layer.kernel_size), max(layer.strides), max(layer.dilation_rate), (left, right, jump))
    if isinstance(layer, (keras.layers.MaxPooling2D, keras.layers.AveragePooling2D)):
        return _conv_reach(max(layer.pool_size), max(layer.strides), 1, (left, right, jump))
    if isinstance(layer, keras.layers.UpSampling2D):  # nearest: from the input at or before; bilinear: both sides
        return left + jump, right + (jump if layer.interpolation != "nearest" else 0.0), jump / max(layer.size)
    if name == "ResizeLike":  # onto its reference's grid (the second input); bilinear reads both neighbours
        coarse = max(r[2] for r in reaches)
        return left + coarse, right + coarse, min(r[2] for r in reaches)
    if isinstance(layer, keras.Model) or name in ("GlobalAveragePooling2D", "GlobalMaxPooling2D", "Flatten",
                                                  "Dense", "Resizing", "Cropping2D", "ZeroPadding2D"):
        return None
    return left, right, jump  # pointwise: activations, normalisation, merges, windowing, padding, crop-back


def receptive_radius(model) -> int | None:
    """The receptive radius of a Keras segmenter in input pixels, from its layers: how far from
    an output pixel an input pixel (or a layer's zero padding) can change it.

    Walks the functional graph in order, tracking for each tensor how far left and right of
    an output's position its inputs reach and the step between outputs: a 'same' convolution
    of kernel ``k`` and dilation ``d`` adds its padding split of ``(k - 1) d`` steps, a
    pooling window likewise, a nearest upsampling one step on the left (bilinear both sides),
    and strides multiply the step; merges take the largest reach. A bound, not an estimate:
    an exact crop (:func:`analysis.prediction.runner.context_window`) that gives the network
    this much real context on each side keeps exactly the whole-slice output.

    Returns:
        The larger of the two reaches, rounded up to whole pixels, or None when a layer's reach
        is unknown (a nested model, a resize to a fixed size): the crop then cannot be exact.
    """
    info: dict[int, Reach] = {id(t): (0.0, 0.0, 1.0) for t in model.inputs}
    for layer in model.layers:
        for node in getattr(layer, "_inbound_nodes", []):
            ins = [info.get(id(t)) for t in node.input_tensors]
            if not ins or any(i is None for i in ins):
                continue  # an input layer, or a node of another graph
            step = _spatial_step(layer, ins)
            if step is None:
                return None
            for out in node.outputs:
                info[id(out)] = step
    found = info.get(id(model.outputs[0]))
    return None if found is None else int(math.ceil(max(found[0], found[1])))


def crop_context(predictor: Predictor) -> int | None:
    """Context (pixels, a multiple of the stride) an exact crop gives a segmenter on each side:
    its receptive radius (:func:`receptive_radius`) rounded up to the stride. None for a
    SavedModel (its layers are not read) or a network of unknown reach: no exact crop."""
    if predictor.model is None:
        return None
    radius = receptive_radius(predictor.model)
    if radius is None:
        return None
    stride = max(1, predictor.run.stride)
    return -(-radius // stride) * stride


def slice_probabilities(predictor: Predictor, volume: np.ndarray, z: Sequence[int], batch_size: int) -> np.ndarray:
    """Probabilities of centre slices ``z`` of ``volume`` ``(slices, rows, cols)`` HU, in batches.

    Returns:
        ``(len(z),)`` for a detector, ``(len(z), rows, cols)`` for a segmenter (float32).
    """
    z = np.asarray(z, np.int64).reshape(-1)
    shape = (z.size,) if predictor.run.task == DETECT else (z.size, *volume.shape[1:])
    out = np.empty(shape, np.float32)
    for start in range(0, z.size, batch_size):
        chunk = z[start:start + batch_size]
        out[start:start + chunk.size] = predictor(context_batch(volume, chunk, predictor.run.context))
    return out


def detect_volume(predictor: Predictor, volume: np.ndarray, batch_size: int) -> np.ndarray:
    """Detector probability of every slice of ``volume`` ``(slices, rows, cols)`` HU.

    Returns:
        ``(slices,)`` float32 probabilities.
    """
    return slice_probabilities(predictor, volume, np.arange(volume.shape[0]), batch_size)


# --- memory ---------------------------------------------------------------------------


def estimate_case_bytes(shape: Sequence[int], *, task: str, context: int, batch_size: int, first_filters: int,
                        image_size: int, stride: int, params: int,
                        network_rc: Sequence[int] | None = None) -> int:
    """Rough upper estimate of the memory one case needs, in bytes.

    The volume as float32 plus its native copy and the uint8 mask (9 bytes a voxel), the
    input batch, ``ACTIVATION_FACTOR * first_filters`` float32 activations per network
    pixel (the padded slice for segmenters, ``image_size**2`` for detectors) and the
    weights; when the slices are resampled to the model's pixel spacing, also the resampled
    volume (float32) and probabilities (float32). It is meant to catch volumes that obviously
    cannot fit, not to be exact.

    Args:
        shape: ``(slices, rows, cols)`` as stored.
        network_rc: ``(rows, cols)`` of a slice as the network sees it after in-plane
            resampling (:func:`analysis.imaging.resample.in_plane_shape`); None: as stored.
    """
    z, rows, cols = (int(s) for s in shape)
    volume = 9 * z * rows * cols
    if network_rc is not None and tuple(int(n) for n in network_rc) != (rows, cols):
        rows, cols = (int(n) for n in network_rc)
        volume += 8 * z * rows * cols
    batch_input = 4 * batch_size * rows * cols * context
    if task == SEGMENT:
        pixels = (-(-rows // stride) * stride) * (-(-cols // stride) * stride)
    else:
        pixels = image_size * image_size + rows * cols
    activations = 4 * batch_size * pixels * ACTIVATION_FACTOR * first_filters
    return volume + batch_input + activations + 4 * params


def check_memory(needed: int, what: str) -> None:
    """Raise :class:`InputError` when ``needed`` bytes exceed the available memory
    (:func:`analysis.resources.require_memory`)."""
    from analysis.resources import require_memory

    require_memory(needed, what, hint="use a smaller --batch-size")

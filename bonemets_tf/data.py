"""tf.data pipelines over the slice cache: patient-level splits, class balance,
lesion-biased crops and augmentation applied identically to image and mask.

Element layout (channels last, float32):
    detect:  ``image (image_size, image_size, context)`` raw HU, ``label (1,)`` 0/1
             (1 when the centre slice has any lesion voxel).
    segment: ``image (S, S, context)`` raw HU, ``mask (S, S, 1)`` 0/1 of the centre slice;
             ``S = image_size`` for training crops, full slices (padded per batch with
             -1024 HU / 0) for validation.
``context`` adjacent axial slices are stacked as channels, centre slice in the middle;
neighbours beyond the first/last slice repeat the edge slice.

Sampling is stateless: training element ``i`` is drawn with seeds derived from
``(seed, stream, i)`` only (``tf.random.experimental.stateless_fold_in``). A pipeline is
therefore identical for a seed whatever the parallelism, a resumed run continues the
stream at ``start = completed_steps * batch_size`` instead of replaying it, and each
multi-worker worker draws its own ``stream``. Slices are drawn with replacement: a
positive (lesion) slice with probability ``positive_fraction``, else a negative one.

Hard negatives (``hard_negative_fraction`` F > 0): each element is, with probability F, a
slice holding hard-negative voxels (``negativesTr``: regions a model called lesion and a
reader rejected), its crop centred on one of those voxels drawn uniformly; the other
elements are drawn as above. The mask there is 0 (the maps never overlap the label:
:func:`analysis.cohort.case.negatives_problems`), so the loss treats them as background
like any other background pixel: they are sampled more often, not weighted. With F = 0
the stream is the same element for element as without hard negatives (their random draws
come from a separate fold of each element's seed).

Storage trade-off (``store="auto"``): when all cases share rows/cols and their voxels
fit in ``memory_limit_bytes`` (default 2 GiB), the volumes are stacked into host-memory
``tf.Variable``s and slices are gathered by pure TF ops (fastest; the phantom and small
cohorts). Otherwise each case stays a memory-mapped ``.npy`` read by
``tf.numpy_function`` inside a parallel map (bounded memory for a paper-sized cohort;
page cache does the buffering, at the cost of holding the GIL during each copy).
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import tensorflow as tf

from bonemets_tf.cache import CachedCase

log = logging.getLogger(__name__)

AIR_HU = -1024.0
MEMORY_LIMIT_BYTES = 2 * 1024 ** 3
#: Hard-negative draws use this fold of each element's seed, so F = 0 leaves the other draws unchanged.
HARD_NEGATIVE_STREAM = 7


@dataclass(frozen=True)
class Augmentation:
    """Random augmentation ranges (all applied in :func:`augment`).

    Attributes:
        flip: random left-right and up-down flips.
        rotate_deg: rotation uniformly in ``[-rotate_deg, rotate_deg]`` degrees.
        scale: zoom factor uniformly in ``[1 - scale, 1 + scale]``.
        hu_offset: HU shift uniformly in ``[-hu_offset, hu_offset]`` (image only).
        hu_scale: HU contrast factor uniformly in ``[1 - hu_scale, 1 + hu_scale]`` (image only).
    """

    flip: bool = True
    rotate_deg: float = 10.0
    scale: float = 0.1
    hu_offset: float = 20.0
    hu_scale: float = 0.03


class SliceStore:
    """Readable slices of a set of cached cases, addressed by a global slice index.

    Global index ``g`` enumerates the slices of ``cases[0]``, then ``cases[1]``, ...

    Args:
        cases: cached cases (all must exist in the cache).
        context: slices per sample (odd).
        store: ``"memory"``, ``"memmap"`` or ``"auto"`` (see module docstring).
        memory_limit_bytes: the ``auto`` threshold.
        negatives: also hold the cases' hard-negative maps (:meth:`read_negatives`; zeros for
            a case without one).
    """

    def __init__(self, cases: Sequence[CachedCase], *, context: int = 1, store: str = "auto",
                 memory_limit_bytes: int = MEMORY_LIMIT_BYTES, negatives: bool = False) -> None:
        if not cases:
            raise ValueError("SliceStore needs at least one case")
        self.cases = list(cases)
        self.context = int(context)
        sizes = np.array([c.shape[0] for c in self.cases], np.int64)
        self.start = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
        self.case_of = np.repeat(np.arange(len(self.cases)), sizes).astype(np.int64)
        self.lo = self.start[self.case_of]
        self.hi = (self.start + sizes - 1)[self.case_of]
        self.positive = np.concatenate([np.asarray(c.positive, bool) for c in self.cases])
        self.hard = np.concatenate([np.asarray(c.hard or (False,) * c.shape[0], bool) for c in self.cases])
        self.negatives = bool(negatives)
        planes = {c.shape[1:] for c in self.cases}
        self.plane = next(iter(planes)) if len(planes) == 1 else (None, None)
        nbytes = int(sizes.sum()) * (4 if negatives else 3) * (math.prod(self.plane) if None not in self.plane else 0)
        if store == "auto":
            store = "memory" if None not in self.plane and nbytes <= memory_limit_bytes else "memmap"
        if store == "memory" and None in self.plane:
            raise ValueError("store='memory' needs all cases to share rows and cols")
        self.mode = store
        self._offsets = np.arange(self.context, dtype=np.int64) - self.context // 2
        if store == "memory":
            with tf.device("/cpu:0"):
                self._ct = tf.Variable(np.concatenate([c.ct() for c in self.cases]), trainable=False, name="ct_slices")
                self._mask = tf.Variable(np.concatenate([c.mask() for c in self.cases]), trainable=False, name="mask_slices")
                if negatives:
                    self._hard = tf.Variable(np.concatenate([c.negatives() for c in self.cases]), trainable=False,
                                             name="hard_negative_slices")
        else:
            self._cts = [c.ct() for c in self.cases]
            self._masks = [c.mask() for c in self.cases]
            self._hards = [c.negatives() for c in self.cases] if negatives else []
        log.info("slice store: %d cases, %d slices (%d with lesion), %s mode",
                 len(self.cases), len(self.positive), int(self.positive.sum()), self.mode)

    @property
    def num_slices(self) -> int:
        return int(len(self.positive))

    def slice_ids(self, positive: bool | None = None) -> np.ndarray:
        """Global indices of all slices, or only positive / negative ones."""
        ids = np.arange(self.num_slices, dtype=np.int64)
        return ids if positive is None else ids[self.positive == positive]

    def hard_slice_ids(self) -> np.ndarray:
        """Global indices of the slices holding hard-negative voxels."""
        return np.flatnonzero(self.hard).astype(np.int64)

    def _read_negatives_numpy(self, g: np.ndarray) -> np.ndarray:
        g = int(g)
        c = int(self.case_of[g])
        return np.ascontiguousarray(self._hards[c][g - self.start[c]][..., None])

    def read_negatives(self, g: tf.Tensor) -> tf.Tensor:
        """The hard-negative map of slice ``g``: ``(rows, cols, 1)`` float32 0/1 (the store
        must hold them: ``negatives=True``)."""
        if not self.negatives:
            raise ValueError("SliceStore built without negatives=True")
        if self.mode == "memory":
            hard = tf.gather(self._hard, g)[..., None]
        else:
            hard = tf.numpy_function(self._read_negatives_numpy, [g], tf.uint8, stateful=False)
        rows, cols = self.plane
        return tf.ensure_shape(tf.cast(hard, tf.float32), (rows, cols, 1))

    def _read_numpy(self, g: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        g = int(g)
        c = int(self.case_of[g])
        zs = np.clip(g + self._offsets, self.lo[g], self.hi[g]) - self.start[c]
        image = np.ascontiguousarray(np.moveaxis(self._cts[c][zs], 0, -1))
        mask = np.ascontiguousarray(self._masks[c][g - self.start[c]][..., None])
        return image, mask

    def read(self, g: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        """Slice ``g`` with its context: ``image (rows, cols, context)`` float32 HU and
        ``mask (rows, cols, 1)`` float32 0/1 of the centre slice."""
        if self.mode == "memory":
            lo = tf.gather(tf.constant(self.lo), g)
            hi = tf.gather(tf.constant(self.hi), g)
            idx = tf.clip_by_value(g + tf.constant(self._offsets), lo, hi)
            image = tf.transpose(tf.gather(self._ct, idx), [1, 2, 0])
            mask = tf.gather(self._mask, g)[..., None]
        else:
            image, mask = tf.numpy_function(self._read_numpy, [g], [tf.int16, tf.uint8], stateful=False)
        rows, cols = self.plane
        image = tf.ensure_shape(tf.cast(image, tf.float32), (rows, cols, self.context))
        mask = tf.ensure_shape(tf.cast(mask, tf.float32), (rows, cols, 1))
        return image, mask


# --- augmentation -------------------------------------------------------------------


def _keys(seed: tf.Tensor, n: int) -> tf.Tensor:
    return tf.random.experimental.stateless_split(seed, num=n)


def _uniform(key, low: float, high: float) -> tf.Tensor:
    return tf.random.stateless_uniform([], key, minval=low, maxval=high)


def augment(image: tf.Tensor, mask: tf.Tensor, seed: tf.Tensor, aug: Augmentation) -> tuple[tf.Tensor, tf.Tensor]:
    """Apply one random flip/rotation/zoom to image and mask alike, then HU jitter to the image.

    Args:
        image: ``(rows, cols, context)`` float32 HU.
        mask: ``(rows, cols, 1)`` float32 0/1.
        seed: stateless seed, shape ``(2,)``.
        aug: ranges.

    Returns:
        ``(image, mask)`` of the same shapes; the image is resampled bilinearly (outside
        filled with air, -1024 HU), the mask by nearest neighbour (outside 0).
    """
    k = _keys(seed, 6)
    if aug.flip:
        lr = _uniform(k[0], 0.0, 1.0) < 0.5
        ud = _uniform(k[1], 0.0, 1.0) < 0.5
        image = tf.cond(lr, lambda: tf.reverse(image, [1]), lambda: image)
        mask = tf.cond(lr, lambda: tf.reverse(mask, [1]), lambda: mask)
        image = tf.cond(ud, lambda: tf.reverse(image, [0]), lambda: image)
        mask = tf.cond(ud, lambda: tf.reverse(mask, [0]), lambda: mask)
    if aug.rotate_deg > 0 or aug.scale > 0:
        angle = _uniform(k[2], -aug.rotate_deg, aug.rotate_deg) * (math.pi / 180.0)
        zoom = _uniform(k[3], 1.0 - aug.scale, 1.0 + aug.scale)
        transform = _rotation_zoom(angle, zoom, tf.shape(image))
        image = _warp(image, transform, "BILINEAR", AIR_HU)
        mask = _warp(mask, transform, "NEAREST", 0.0)
    if aug.hu_offset > 0 or aug.hu_scale > 0:
        image = image * _uniform(k[4], 1.0 - aug.hu_scale, 1.0 + aug.hu_scale) + _uniform(k[5], -aug.hu_offset, aug.hu_offset)
    return image, mask


def _rotation_zoom(angle: tf.Tensor, zoom: tf.Tensor, shape: tf.Tensor) -> tf.Tensor:
    """Projective transform (8 values) mapping OUTPUT pixel (x, y) to the input pixel:
    rotation by ``angle`` and magnification ``zoom`` about the image centre."""
    cy = (tf.cast(shape[0], tf.float32) - 1.0) / 2.0
    cx = (tf.cast(shape[1], tf.float32) - 1.0) / 2.0
    c, s = tf.cos(angle) / zoom, tf.sin(angle) / zoom
    a2 = cx - c * cx + s * cy
    b2 = cy - s * cx - c * cy
    return tf.stack([c, -s, a2, s, c, b2, 0.0, 0.0])[None, :]


def _warp(x: tf.Tensor, transform: tf.Tensor, interpolation: str, fill: float) -> tf.Tensor:
    out = tf.raw_ops.ImageProjectiveTransformV3(
        images=x[None], transforms=transform, output_shape=tf.shape(x)[:2],
        fill_value=fill, interpolation=interpolation, fill_mode="CONSTANT")
    return tf.ensure_shape(out[0], x.shape)


# --- cropping -----------------------------------------------------------------------


def _pad_to(x: tf.Tensor, size: int, value: float) -> tf.Tensor:
    shape = tf.shape(x)
    pad_r = tf.maximum(size - shape[0], 0)
    pad_c = tf.maximum(size - shape[1], 0)
    return tf.pad(x, [[pad_r // 2, pad_r - pad_r // 2], [pad_c // 2, pad_c - pad_c // 2], [0, 0]],
                  constant_values=value)


def lesion_biased_crop(image: tf.Tensor, mask: tf.Tensor, size: int, seed: tf.Tensor,
                       lesion_p: float | tf.Tensor, focus: tf.Tensor | None = None) -> tuple[tf.Tensor, tf.Tensor]:
    """Crop ``size x size`` from image and mask at the same place.

    With probability ``lesion_p`` (when the slice has lesion) the crop is centred on a
    lesion pixel drawn uniformly, else its position is uniform. Slices smaller than
    ``size`` are padded first (air / 0). ``focus`` (``(rows, cols, 1)`` 0/1, e.g. a
    hard-negative map) replaces the mask as what the crop centres on.
    """
    k = _keys(seed, 4)
    image = _pad_to(image, size, AIR_HU)
    mask = _pad_to(mask, size, 0.0)
    focus = mask if focus is None else _pad_to(focus, size, 0.0)
    shape = tf.shape(mask)
    max_r, max_c = shape[0] - size, shape[1] - size
    lesion = tf.where(focus[..., 0] > 0.5)
    n = tf.shape(lesion, out_type=tf.int64)[0]
    use_lesion = tf.logical_and(n > 0, _uniform(k[0], 0.0, 1.0) < lesion_p)
    pick = tf.random.stateless_uniform([], k[1], minval=0, maxval=tf.maximum(n, 1), dtype=tf.int64)
    centre = tf.cond(n > 0, lambda: tf.cast(tf.gather(lesion, pick), tf.int32), lambda: tf.zeros([2], tf.int32))
    r_rand = tf.random.stateless_uniform([], k[2], minval=0, maxval=max_r + 1, dtype=tf.int32)
    c_rand = tf.random.stateless_uniform([], k[3], minval=0, maxval=max_c + 1, dtype=tf.int32)
    r0 = tf.where(use_lesion, tf.clip_by_value(centre[0] - size // 2, 0, max_r), r_rand)
    c0 = tf.where(use_lesion, tf.clip_by_value(centre[1] - size // 2, 0, max_c), c_rand)
    image = image[r0:r0 + size, c0:c0 + size, :]
    mask = mask[r0:r0 + size, c0:c0 + size, :]
    return tf.ensure_shape(image, (size, size, image.shape[-1])), tf.ensure_shape(mask, (size, size, 1))


def resize(image: tf.Tensor, size: int) -> tf.Tensor:
    """Bilinear resize of ``(rows, cols, C)`` to ``(size, size, C)`` (same op as the
    detectors' in-model ``Resizing`` layer, so resizing twice is the identity)."""
    out = tf.image.resize(image, (size, size), method="bilinear")
    return tf.ensure_shape(out, (size, size, image.shape[-1]))


# --- datasets -----------------------------------------------------------------------


@dataclass(frozen=True)
class Sampling:
    """How training elements are drawn.

    Attributes:
        task: ``"detect"`` or ``"segment"``.
        image_size: detector resize side / segmenter crop side.
        positive_fraction: probability of drawing a lesion slice (class balance).
        lesion_crop_p: segmenters: probability of centring a positive slice's crop on lesion.
        augmentation: augmentation ranges.
        hard_negative_fraction: share of elements drawn from slices with hard negatives,
            segmenters' crops centred on them (module docstring); the store must hold the maps.
    """

    task: str
    image_size: int = 256
    positive_fraction: float = 0.5
    lesion_crop_p: float = 0.7
    augmentation: Augmentation = Augmentation()
    hard_negative_fraction: float = 0.0


def training_dataset(store: SliceStore, sampling: Sampling, *, batch_size: int, seed: int,
                     stream: int = 0, start: int = 0) -> tf.data.Dataset:
    """Infinite, deterministic training dataset of ``(image, target)`` batches.

    Args:
        store: training slices (training cases only).
        sampling: task, sizes, balance and augmentation.
        batch_size: batch size of this pipeline (per worker).
        seed: run seed.
        stream: independent random stream (multi-worker: the worker index).
        start: index of the first element (``completed_steps * batch_size`` on resume).

    Returns:
        Batches of ``(image, label (B, 1))`` (detect) or ``(image, mask (B, S, S, 1))``.

    Raises:
        ValueError: ``hard_negative_fraction`` > 0 with a store without hard-negative maps or
            without a slice holding one.
    """
    hard_frac = sampling.hard_negative_fraction
    hard = store.hard_slice_ids()
    if hard_frac > 0 and (not store.negatives or len(hard) == 0):
        raise ValueError("hard_negative_fraction > 0 needs a SliceStore with negatives=True and hard-negative voxels")
    hard_t = tf.constant(hard if len(hard) else np.zeros(1, np.int64))
    pos = store.slice_ids(True)
    neg = store.slice_ids(False)
    frac = sampling.positive_fraction
    if len(pos) == 0 or len(neg) == 0:
        log.warning("training slices are all %s; class balancing is off", "negative" if len(pos) == 0 else "positive")
        frac = 0.0 if len(pos) == 0 else 1.0
    pos_t = tf.constant(pos if len(pos) else np.zeros(1, np.int64))
    neg_t = tf.constant(neg if len(neg) else np.zeros(1, np.int64))
    base = tf.constant([seed, stream], tf.int64)
    size = sampling.image_size

    def element(i):
        key = tf.random.experimental.stateless_fold_in(base, i)
        k = _keys(key, 5)
        take_pos = _uniform(k[0], 0.0, 1.0) < frac
        ip = tf.random.stateless_uniform([], k[1], minval=0, maxval=tf.size(pos_t, tf.int64), dtype=tf.int64)
        ineg = tf.random.stateless_uniform([], k[2], minval=0, maxval=tf.size(neg_t, tf.int64), dtype=tf.int64)
        g = tf.where(take_pos, tf.gather(pos_t, ip), tf.gather(neg_t, ineg))
        take_hard = tf.constant(False)
        if hard_frac > 0:
            kh = _keys(tf.random.experimental.stateless_fold_in(key, HARD_NEGATIVE_STREAM), 2)
            take_hard = _uniform(kh[0], 0.0, 1.0) < hard_frac
            ih = tf.random.stateless_uniform([], kh[1], minval=0, maxval=tf.size(hard_t, tf.int64), dtype=tf.int64)
            g = tf.where(take_hard, tf.gather(hard_t, ih), g)
        image, mask = store.read(g)
        if sampling.task == "detect":
            label = tf.cast(tf.reduce_max(mask) > 0.5, tf.float32)[None]
            image, _ = augment(resize(image, size), tf.zeros((size, size, 1)), k[3], sampling.augmentation)
            return image, label
        if hard_frac > 0:
            focus = tf.cond(take_hard, lambda: store.read_negatives(g), lambda: mask)
            lesion_p = tf.where(take_hard, 1.0, sampling.lesion_crop_p)
            image, mask = lesion_biased_crop(image, mask, size, k[4], lesion_p, focus)
        else:
            image, mask = lesion_biased_crop(image, mask, size, k[4], sampling.lesion_crop_p)
        return augment(image, mask, k[3], sampling.augmentation)

    ds = tf.data.Dataset.counter(start=start, dtype=tf.int64)
    ds = ds.map(element, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    ds = ds.batch(batch_size, drop_remainder=True).prefetch(tf.data.AUTOTUNE)
    return ds.with_options(_options())


def validation_dataset(store: SliceStore, task: str, *, batch_size: int, image_size: int = 256,
                       max_slices: int | None = None) -> tf.data.Dataset:
    """Finite validation dataset over every slice of ``store`` (in order), no augmentation.

    Detectors get resized slices and labels; segmenters get full slices and masks,
    padded per batch to the largest slice (-1024 HU / 0). ``max_slices`` keeps an evenly
    spaced subset (always including every positive slice first) to bound validation time.
    """
    ids = store.slice_ids()
    if max_slices is not None and len(ids) > max_slices:
        pos, neg = store.slice_ids(True), store.slice_ids(False)
        keep = pos[np.linspace(0, len(pos) - 1, min(len(pos), max_slices)).astype(int)] if len(pos) else pos
        rest = max_slices - len(keep)
        if rest > 0 and len(neg):
            keep = np.concatenate([keep, neg[np.linspace(0, len(neg) - 1, min(len(neg), rest)).astype(int)]])
        ids = np.sort(keep)

    def element(g):
        image, mask = store.read(g)
        if task == "detect":
            return resize(image, image_size), tf.cast(tf.reduce_max(mask) > 0.5, tf.float32)[None]
        return image, mask

    ds = tf.data.Dataset.from_tensor_slices(ids).map(element, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    if task == "detect":
        ds = ds.batch(batch_size)
    else:
        ds = ds.padded_batch(batch_size, padded_shapes=([None, None, store.context], [None, None, 1]),
                             padding_values=(AIR_HU, 0.0))
    return ds.prefetch(tf.data.AUTOTUNE).with_options(_options())


def _options() -> tf.data.Options:
    options = tf.data.Options()
    options.deterministic = True
    # each worker draws its own stream (see module docstring); no file-based sharding
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.OFF
    return options

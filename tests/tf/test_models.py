"""Shared harness: every registered model is checked the same way."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

keras = pytest.importorskip("keras")

from bonemets_tf.models.catalog import CATALOG, names  # noqa: E402
from bonemets_tf.models.registry import REGISTRY, build_model  # noqa: E402

TINY = 64


def tiny(name: str) -> keras.Model:
    width = 0.25 if CATALOG[name].scalable else 1.0
    return build_model(name, context=3, width=width, image_size=TINY)


@pytest.fixture(scope="module", params=list(REGISTRY))
def built(request):
    keras.utils.set_random_seed(0)
    return request.param, tiny(request.param)


def _input(rows: int = TINY, cols: int = TINY) -> np.ndarray:
    rng = np.random.default_rng(1)
    return rng.uniform(-1000, 1500, (2, rows, cols, 3)).astype("float32")


def test_catalog_equals_registry():
    assert list(CATALOG) == list(REGISTRY)
    assert all(REGISTRY[n].entry is CATALOG[n] for n in CATALOG)
    assert names("detect") == ["efficientnet", "resnet34", "densenet"]
    assert names("segment") == ["unet", "resunet", "resattunet"]


def test_output_shape_and_range(built):
    name, model = built
    y = np.asarray(model(_input(), training=False))
    expected = (2, 1) if CATALOG[name].task == "detect" else (2, TINY, TINY, 1)
    assert y.shape == expected
    assert y.dtype == np.float32 and np.all((y >= 0) & (y <= 1))


def test_segmenters_accept_any_size(built):
    name, model = built
    if CATALOG[name].task != "segment":
        pytest.skip("detectors resize internally")
    y = np.asarray(model(_input(37, 50), training=False))  # not multiples of the stride
    assert y.shape == (2, 37, 50, 1)


def test_flat_graph_with_window_layer(built):
    _, model = built
    assert not any(isinstance(layer, keras.Model) for layer in model.layers), "nested sub-model"
    assert any(type(layer).__name__ == "HUWindow" for layer in model.layers)


def test_config_round_trip(built):
    _, model = built
    clone = keras.Model.from_config(model.get_config())
    clone.set_weights(model.get_weights())
    x = _input()
    np.testing.assert_allclose(clone(x, training=False), model(x, training=False), rtol=1e-5, atol=1e-6)


def test_keras_save_load_identical(built, tmp_path):
    name, model = built
    path = tmp_path / f"{name}.keras"
    model.save(path)
    loaded = keras.models.load_model(path)
    x = _input()
    np.testing.assert_array_equal(np.asarray(loaded(x, training=False)), np.asarray(model(x, training=False)))


def test_width_scales_filters():
    small = build_model("unet", width=0.25).count_params()
    full = build_model("unet", width=1.0).count_params()
    assert 12 < full / small < 20  # conv params scale ~ width^2


@pytest.mark.slow
@pytest.mark.parametrize("name", list(REGISTRY))
def test_full_width_params(name):
    count = build_model(name).count_params()
    paper = CATALOG[name].paper_params
    reference = {
        # keras.applications at 1 channel + our Dense(1) head: independent builds
        "efficientnet": lambda: keras.applications.EfficientNetB0(include_top=False, weights=None,
                                                                  input_shape=(256, 256, 1)).count_params() + 1281,
        "densenet": lambda: keras.applications.DenseNet121(include_top=False, weights=None,
                                                           input_shape=(256, 256, 1)).count_params() + 1025,
        # keras_hub's ResNet34 backbone: 21,295,424 with 1 channel (domain-facts.md) + head
        "resnet34": lambda: 21_295_424 + 513,
    }
    if paper is not None:
        assert abs(count - paper) / paper < 0.10, f"{name}: {count:,} vs paper {paper:,}"
    else:
        assert count == reference[name]()


def test_import_does_not_import_torch():
    code = ("import sys, bonemets_tf, bonemets_tf.models.catalog; assert 'tensorflow' not in sys.modules;"
            "import bonemets_tf.models.registry, bonemets_tf.data, bonemets_tf.train;"
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)

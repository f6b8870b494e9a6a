"""export: a SavedModel that runs without the project and matches the Keras model."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from analysis.errors import InputError
from bonemets_tf.export import export_savedmodel
from bonemets_tf.run import read_run
from tests.tf.infer_runs import shared_runs


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    runs = shared_runs(tmp_path_factory)
    base = tmp_path_factory.mktemp("export")
    return runs, {name: export_savedmodel(getattr(runs, name), base / f"sm_{name}")
                  for name in ("segmenter", "detector")}


# Runs in a fresh interpreter, cwd = a temp folder, isolated mode (-I: no PYTHONPATH, no
# script folder on sys.path): only TensorFlow, never this project.
LOADER = textwrap.dedent("""
    import sys
    import numpy as np
    import tensorflow as tf
    x = np.load("x.npy")
    for name in ("segmenter", "detector"):
        fn = tf.saved_model.load(sys.argv[1] if name == "segmenter" else sys.argv[2]).signatures["serving_default"]
        out = fn(ct_hu=tf.constant(x[..., :int(sys.argv[3 if name == "segmenter" else 4])]))
        np.save(f"y_{name}.npy", out["lesion_probability"].numpy())
    assert not any(m.split(".")[0] in ("bonemets_tf", "analysis", "cli") for m in sys.modules), sorted(sys.modules)
""")


def test_savedmodel_matches_keras_without_the_project(exported, tmp_path):
    runs, paths = exported
    x = np.random.default_rng(1).uniform(-1100, 1600, (3, 37, 45, 3)).astype(np.float32)  # 37, 45: not multiples of 8
    np.save(tmp_path / "x.npy", x)
    seg, det = read_run(runs.segmenter), read_run(runs.detector)
    (tmp_path / "load.py").write_text(LOADER, encoding="utf-8")
    subprocess.run([sys.executable, "-I", "load.py", str(paths["segmenter"]), str(paths["detector"]),
                    str(seg.context), str(det.context)], check=True, cwd=tmp_path, timeout=300)
    want_seg = seg.load_model()(x[..., :seg.context], training=False).numpy()[..., 0]
    want_det = det.load_model()(x[..., :det.context], training=False).numpy()[:, 0]
    got_seg, got_det = np.load(tmp_path / "y_segmenter.npy"), np.load(tmp_path / "y_detector.npy")
    assert got_seg.shape == (3, 37, 45) and got_det.shape == (3,)
    np.testing.assert_allclose(got_seg, want_seg, atol=1e-5)
    np.testing.assert_allclose(got_det, want_det, atol=1e-5)


def test_config_travels_as_an_asset(exported):
    runs, paths = exported
    config = json.loads((paths["segmenter"] / "assets" / "bonemets_config.json").read_text(encoding="utf-8"))
    assert config["settings"]["arch"] == "unet" and config["export"]["task"] == "segment"
    assert config["export"]["output"] == {"lesion_probability": "float32 [batch, rows, cols]"}
    assert config["split"] == json.loads((runs.segmenter / "config.json").read_text(encoding="utf-8"))["split"]


@pytest.mark.skipif(shutil.which("saved_model_cli", path=str(Path(sys.executable).parent)) is None,
                    reason="saved_model_cli is not installed beside this Python")
def test_saved_model_cli_lists_the_signature(exported):
    _, paths = exported
    cli = shutil.which("saved_model_cli", path=str(Path(sys.executable).parent))
    proc = subprocess.run([cli, "show", "--dir", str(paths["detector"]), "--tag_set", "serve",
                           "--signature_def", "serving_default"], capture_output=True, text=True, timeout=300, encoding="utf-8", errors="replace")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "inputs['ct_hu']" in proc.stdout and "shape: (-1, -1, -1, 1)" in proc.stdout
    assert "outputs['lesion_probability']" in proc.stdout and "shape: (-1)" in proc.stdout


def test_export_refuses_bad_run_and_existing_output(exported, tmp_path):
    runs, _ = exported
    with pytest.raises(InputError, match="not a RUN folder"):
        export_savedmodel(tmp_path, tmp_path / "sm")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "f").write_text("x", encoding="utf-8")
    with pytest.raises(InputError, match="--overwrite"):
        export_savedmodel(runs.detector, tmp_path / "busy")
    assert [p.name for p in (tmp_path / "busy").iterdir()] == ["f"]


def test_every_segmenter_traces_with_unknown_slice_size():
    """A SavedModel signature has unknown rows/cols; every segmenter must trace that way
    (bilinear UpSampling2D in the attention gates did not)."""
    import numpy as np
    import tensorflow as tf

    from bonemets_tf.models.registry import REGISTRY, build_model

    x = np.random.default_rng(0).uniform(-1000, 1500, size=(2, 40, 56, 1)).astype("float32")
    for name, spec in REGISTRY.items():
        if spec.task != "segment":
            continue
        model = build_model(name, width=0.125)
        fn = tf.function(lambda t, m=model: m(t, training=False),
                         input_signature=[tf.TensorSpec([None, None, None, 1], tf.float32)])
        out = fn(tf.constant(x)).numpy()
        assert out.shape == (2, 40, 56, 1), name
        np.testing.assert_allclose(out, model.predict_on_batch(x), atol=1e-5)

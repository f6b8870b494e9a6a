"""The demo's stage kinds: each calls one library function with JSON-able arguments.

A stage is data, ``{"kind": "train", "params": {...}}``: the orchestration (:mod:`study.demo`)
writes it to a plan, and a group process (:mod:`study.batch`) builds the library's option
dataclasses from it (:class:`bonemets_tf.train.TrainConfig`,
:class:`bonemets_tf.predict.PredictOptions`, :class:`nnunet_bridge.train.TrainOptions`,
:class:`nnunet_bridge.predict.PredictOptions`, the analysis settings) and calls the library
function, never the command line. Each kind imports its framework only when it runs, so a
group of Keras stages never loads PyTorch and the reverse.

:func:`check_stage` builds a stage's dataclasses without running anything, so a renamed
option fails in a test (and before a group starts), not halfway through a demo.
"""
from __future__ import annotations

import logging
from dataclasses import fields
from typing import Any, Callable

log = logging.getLogger("bonemets.demo")


def _only_fields(cls: type, values: dict[str, Any], kind: str) -> dict[str, Any]:
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise TypeError(f"stage {kind}: {cls.__name__} has no field(s) {', '.join(unknown)}")
    return values


def _phantom(p: dict[str, Any], run: bool) -> None:
    from analysis.cohort.phantom import generate_cohort

    if run:
        generate_cohort(p["out"], cases=p["cases"], seed=p["seed"], shape=tuple(p["shape"]),
                        spacing=tuple(p["spacing"]), progress=lambda done, total, case: log.info(
                            "phantom: wrote %s (%d/%d)", case, done, total))


def _split(p: dict[str, Any], run: bool) -> None:
    from analysis.cohort.splits import write_splits

    if run:
        write_splits(p["dataset"], test_fraction=p["test_fraction"], folds=p["folds"], seed=p["seed"])


def _examples(p: dict[str, Any], run: bool) -> None:
    from analysis.cohort.examples import write_example_patients

    if run:
        write_example_patients(p["out"], shape=tuple(p["shape"]), spacing=tuple(p["spacing"]))


def _train(p: dict[str, Any], run: bool) -> None:
    from bonemets_tf.train import TrainConfig, train

    config = TrainConfig(**_only_fields(TrainConfig, p["config"], "train"))
    if run:
        train(config, p["out"], resume=p.get("resume", False))


def _predict(p: dict[str, Any], run: bool) -> None:
    from bonemets_tf.predict import PredictOptions, predict

    options = PredictOptions(**_only_fields(PredictOptions, p["options"], "predict"))
    if run:
        predict(p["model"], p.get("dataset"), p["out"], options=options, detector=p.get("detector"),
                images=p.get("images"))


def _gradcam(p: dict[str, Any], run: bool) -> None:
    from bonemets_tf.gradcam import gradcam

    if run:
        gradcam(p["model"], p["dataset"], p["out"], cases=p["cases"], max_slices=p["max_slices"])


def _export(p: dict[str, Any], run: bool) -> None:
    from bonemets_tf.export import export_savedmodel

    if run:
        export_savedmodel(p["model"], p["out"])


def _nnunet_train(p: dict[str, Any], run: bool) -> None:
    from nnunet_bridge.train import TrainOptions, train

    values = dict(_only_fields(TrainOptions, p["options"], "nnunet-train"))
    values["folds"] = tuple(values.get("folds", (0,)))
    if values.get("patch_size") is not None:
        values["patch_size"] = tuple(values["patch_size"])
    options = TrainOptions(**values)
    if run:
        report = train(p["dataset"], p["work"], options)
        log.info("nnU-Net: trained fold(s) %s of plan %s; network parameters %s", report.folds, report.plans,
                 f"{report.parameters:,}")


def _nnunet_predict(p: dict[str, Any], run: bool) -> None:
    from nnunet_bridge.predict import PredictOptions, predict

    values = dict(_only_fields(PredictOptions, p["options"], "nnunet-predict"))
    if values.get("folds") is not None:
        values["folds"] = tuple(values["folds"])
    options = PredictOptions(**values)
    if run:
        predict(p["dataset"], p["work"], p["out"], options)


def _analyze(p: dict[str, Any], run: bool) -> None:
    import inspect

    from analysis.evaluation.analyze import run_analysis

    settings = p["settings"]
    accepted = set(inspect.signature(run_analysis).parameters)
    unknown = sorted(set(settings) - accepted)
    if unknown:
        raise TypeError(f"stage analyze: run_analysis takes no argument(s) {', '.join(unknown)}")
    if run:
        run_analysis(p["dataset"], p["predictions"], p["out"], **settings)


KINDS: dict[str, Callable[[dict[str, Any], bool], None]] = {
    "phantom": _phantom, "split": _split, "examples": _examples, "train": _train, "predict": _predict,
    "gradcam": _gradcam, "export": _export, "nnunet-train": _nnunet_train, "nnunet-predict": _nnunet_predict,
    "analyze": _analyze,
}

#: The wing whose framework each kind imports (its group runs with that wing's interpreter,
#: :mod:`study.wings`); the other kinds need neither framework.
WING_OF_KIND = {"train": "tf", "predict": "tf", "gradcam": "tf", "export": "tf", "nnunet-train": "torch",
                "nnunet-predict": "torch"}


def stage_wing(kind: str) -> str | None:
    """``"tf"``, ``"torch"`` or None (data and analysis kinds) for a stage kind."""
    if kind not in KINDS:
        raise KeyError(f"unknown stage kind {kind!r}")
    return WING_OF_KIND.get(kind)


def run_stage(kind: str, params: dict[str, Any]) -> None:
    """Run one stage: build its options and call the library.

    Raises:
        KeyError: an unknown kind; TypeError: options the library does not take;
        analysis.errors.InputError: bad input, from the library.
    """
    KINDS[kind](params, True)


def check_stage(kind: str, params: dict[str, Any]) -> None:
    """Build a stage's option dataclasses without running it (imports its framework's modules).

    Raises:
        KeyError, TypeError: as :func:`run_stage`.
    """
    KINDS[kind](params, False)

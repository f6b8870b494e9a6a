"""Run consecutive demo stages of one framework in one process: ``python -m study.batch PLAN``.

Each stage calls its library function (:mod:`study.stages`); only the interpreter is
shared, so TensorFlow (or PyTorch) starts once per group instead of once per stage.
Starting TensorFlow and Keras costs seconds per process on a small CPU, a large share of the
quick demo.

PLAN is a JSON file written by :class:`study.demo.Demo`::

    {"total": 23, "stages": [{"name": "predict-unet", "index": 12, "kind": "predict",
                              "params": {...}, "marker": "DIR/.stages/predict-unet.json"}, ...]}

Every stage's options are built first (a renamed option fails before any work). After each
stage succeeds its marker is written, so an interrupted group resumes at the first
unfinished stage. The first failing stage ends the process: bad input is one ``error:``
line and exit code 2, as on the command line.
"""
from __future__ import annotations

import gc
import json
import logging
import sys
import time
from pathlib import Path

log = logging.getLogger("bonemets.demo")


def _release_frameworks() -> None:
    """Free the previous stage's models and graphs before the next stage builds its own."""
    if "keras" in sys.modules:
        import keras

        keras.backend.clear_session()
    gc.collect()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m study.batch PLAN.json", file=sys.stderr)
        return 2
    plan = json.loads(Path(argv[0]).read_text(encoding="utf-8"))
    from analysis.errors import InputError
    from analysis.imaging.io import atomic_write_json
    from study.stages import check_stage, run_stage

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    for name in ("bonemets", "analysis", "bonemets_tf", "nnunet_bridge", "study"):
        logging.getLogger(name).setLevel(logging.INFO)
    for stage in plan["stages"]:
        check_stage(stage["kind"], stage["params"])
    for stage in plan["stages"]:
        tag = f"[{stage['index']}/{plan['total']}] {stage['name']}"
        log.info("%s: %s %s", tag, stage["kind"], json.dumps(stage.get("shown", stage["params"])))
        start = time.perf_counter()
        try:
            run_stage(stage["kind"], stage["params"])
        except InputError as exc:
            print(f"error: {exc}", file=sys.stderr)
            log.error("%s: failed (bad input)", tag)
            return exc.exit_code
        except KeyboardInterrupt:
            log.error("%s: interrupted", tag)
            return 130
        seconds = time.perf_counter() - start
        atomic_write_json(Path(stage["marker"]), {"stage": stage["name"], "kind": stage["kind"],
                                                  "params": stage["params"], "seconds": round(seconds, 2),
                                                  "shared_process": len(plan["stages"]) > 1})
        log.info("%s: finished in %.0f s", tag, seconds)
        _release_frameworks()
    return 0


if __name__ == "__main__":
    sys.exit(main())

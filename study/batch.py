"""Run consecutive demo stages of one framework in one process: ``python -m study.batch PLAN``.

Each stage is still exactly its ``python cli.py ...`` command (same arguments, same code
path, same one-line errors); only the interpreter is shared, so TensorFlow (or PyTorch)
starts once per group instead of once per stage. Starting TensorFlow and Keras costs
seconds per process on a small CPU, a large share of the quick demo.

PLAN is a JSON file written by :class:`study.demo.Demo`::

    {"total": 23, "stages": [{"name": "predict-unet", "index": 12, "args": ["predict", ...],
                              "marker": "DIR/.stages/predict-unet.json"}, ...]}

After each stage succeeds its marker is written (as the demo does for a single stage), so
an interrupted group resumes at the first unfinished stage. The first failing stage ends
the process with that stage's exit code.
"""
from __future__ import annotations

import gc
import json
import logging
import sys
import time
from pathlib import Path

log = logging.getLogger("bonemets.demo")


def _invoke(args: list[str]) -> int:
    """Run one ``cli.py`` command in this process; its exit code."""
    import click

    import cli

    try:
        cli.main.main(args=args, prog_name="cli.py", standalone_mode=False)
    except SystemExit as exc:  # BonemetsGroup reports bad input as one line, then exits
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except click.ClickException as exc:
        exc.show()
        return exc.exit_code
    except click.exceptions.Abort:
        return 130
    return 0


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
    from analysis.io import atomic_write_json

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    for stage in plan["stages"]:
        tag = f"[{stage['index']}/{plan['total']}] {stage['name']}"
        log.info("%s: cli.py %s", tag, " ".join(stage.get("shown", stage["args"])))
        start = time.perf_counter()
        code = _invoke(list(stage["args"]))
        seconds = time.perf_counter() - start
        if code != 0:
            log.error("%s: failed with exit code %d", tag, code)
            return code
        atomic_write_json(Path(stage["marker"]), {"stage": stage["name"], "command": stage["command"],
                                                  "seconds": round(seconds, 2), "shared_process": True})
        log.info("%s: finished in %.0f s", tag, seconds)
        _release_frameworks()
    return 0


if __name__ == "__main__":
    sys.exit(main())

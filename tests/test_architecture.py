"""The shape of the code, proved from the source (STYLE: the shape of the project):

* no import cycle inside or across ``analysis``, ``bonemets_tf``, ``nnunet_bridge``, ``study``,
  counting every import (module level and the deferred ones inside functions);
* nothing in ``study/`` imports ``cli``: the orchestration calls the library;
* the core's rooms stack bottom to top (floor, imaging, lesions, cohort, prediction,
  evaluation) and each imports only from the rooms below it;
* both wings and ``analyze`` take the PRED folder contract from :mod:`analysis.prediction.folder`
  and keep no copy of its pieces;
* every demo stage builds its library options (a renamed option fails here, not mid-demo).
"""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("analysis", "bonemets_tf", "nnunet_bridge", "study")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imports(path: Path) -> set[str]:
    """Every module ``path`` imports (absolute names), wherever the import statement stands."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)
    return found


def _graph() -> dict[str, set[str]]:
    files = {(_module_name(p)): p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}
    graph = {}
    for name, path in files.items():
        targets = set()
        for imported in _imports(path):
            while imported and imported not in files:  # `from a.b import c`: c may be a name, not a module
                imported = imported.rpartition(".")[0]
            if imported and imported != name and not name.startswith(imported + "."):
                # a package's own __init__ being imported by its submodules is not a cycle of modules
                targets.add(imported)
        graph[name] = targets
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_no_import_cycle_in_any_package():
    graph = _graph()
    assert len(graph) > 40
    assert _cycle(graph) is None, " -> ".join(_cycle(graph))


def test_the_cycle_finder_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


#: The core's rooms, bottom to top (analysis/__init__.py). A module may import its own room
#: and the rooms below it, never one above.
ROOMS = (("analysis.errors", "analysis.resources"), ("analysis.imaging",), ("analysis.lesions",),
         ("analysis.cohort",), ("analysis.prediction",),
         ("analysis.evaluation", "analysis.node", "analysis.monitoring", "analysis.review"))


def _room(module: str) -> int | None:
    for level, names in enumerate(ROOMS):
        if any(module == n or module.startswith(n + ".") for n in names):
            return level
    return None


def _upward_imports(graph: dict[str, set[str]]) -> list[str]:
    bad = []
    for module, targets in graph.items():
        own = _room(module)
        if own is None:
            continue
        for target in targets:
            theirs = _room(target)
            if theirs is not None and theirs > own:
                bad.append(f"{module} (room {own}) imports {target} (room {theirs})")
    return sorted(bad)


def test_every_core_module_lives_in_a_room():
    homeless = [m for m in _graph() if m.startswith("analysis.") and _room(m) is None]
    assert not homeless, homeless


def test_core_rooms_import_only_from_below():
    assert _upward_imports(_graph()) == []


def test_the_lesions_room_stands_on_imaging_and_the_floor_only():
    graph = _graph()
    lesions = ROOMS.index(("analysis.lesions",))
    modules = sorted(m for m in graph if _room(m) == lesions)
    assert modules == ["analysis.lesions", "analysis.lesions.change", "analysis.lesions.instances",
                       "analysis.lesions.overlap"]
    for module in modules:
        core = {t for t in graph[module] if _room(t) is not None}
        assert all(_room(t) <= lesions for t in core), f"{module} imports {sorted(core)}"
        assert not {t for t in graph[module] if t.split(".")[0] in ("bonemets_tf", "nnunet_bridge", "study", "cli")}


def test_the_room_check_sees_an_upward_import():
    graph = {"analysis.imaging.io": {"analysis.prediction.folder"}, "analysis.evaluation.analyze": {"analysis.lesions"}}
    assert _upward_imports(graph) == ["analysis.imaging.io (room 1) imports analysis.prediction.folder (room 4)"]


def test_study_never_imports_the_command_line():
    for path in (ROOT / "study").rglob("*.py"):
        assert not {"cli", "click"} & _imports(path), f"{path} imports the command line"


def test_both_wings_and_analyze_take_the_pred_contract_from_one_module():
    users = [ROOT / "bonemets_tf" / "predict.py", ROOT / "nnunet_bridge" / "predict.py", ROOT / "analysis" / "evaluation" / "analyze.py"]
    for path in users:
        assert "analysis.prediction.folder" in _imports(path), path
    contract = ("def read_slices_csv", "def discover_models", "def select_cases", "def remove_small_components",
                "def format_slices_csv", "def check_ct", 'SLICES_CSV = "', 'DETECTOR_CSV = "',
                "output folder exists and is not empty", "voxel(s) are NaN or infinite")
    for pkg in PACKAGES:
        for path in (ROOT / pkg).rglob("*.py"):
            if (path.parent.name, path.name) in (("prediction", "folder.py"), ("imaging", "io.py")):
                continue
            text = path.read_text(encoding="utf-8")
            for piece in contract:
                assert piece not in text, f"{path} has its own copy of {piece!r}"
            if pkg in ("bonemets_tf", "nnunet_bridge"):  # lesions are analysis.lesions.lesion_instances
                assert "cc3d" not in text, f"{path} computes lesion components itself"


def _class_fields(path: Path, name: str) -> tuple[list[str], list[str]]:
    """``(bases, annotated field names)`` of class ``name`` in ``path``."""
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ClassDef) and node.name == name:
            bases = [ast.unparse(b) for b in node.bases]
            names = [s.target.id for s in node.body if isinstance(s, ast.AnnAssign) and isinstance(s.target, ast.Name)]
            return bases, names
    raise AssertionError(f"{path}: no class {name}")


def test_both_wings_build_their_options_on_the_one_prediction_request():
    _, shared = _class_fields(ROOT / "analysis" / "prediction" / "request.py", "PredictRequest")
    assert {"cases", "shard", "series", "probabilities", "dicom_seg", "preview", "crop", "bones", "bones_from",
            "min_size", "overwrite"} <= set(shared)
    for wing in ("bonemets_tf", "nnunet_bridge"):
        path = ROOT / wing / "predict.py"
        bases, own = _class_fields(path, "PredictOptions")
        assert bases == ["PredictRequest"], f"{path}: PredictOptions must extend the shared PredictRequest"
        assert not set(own) & set(shared), f"{path} redeclares shared fields {sorted(set(own) & set(shared))}"
        imports = _imports(path)
        assert "analysis.prediction.request" in imports and "analysis.prediction.request.predict_folder" in imports
        text = path.read_text(encoding="utf-8")
        for private in ("PredictionFolder(", "run_cases(", "plan_inputs(", ".finish("):
            assert private not in text, f"{path} runs {private!r} itself instead of predict_folder"
    cli = (ROOT / "cli.py").read_text(encoding="utf-8")
    for option in ('"--probabilities"', '"--dicom-seg"', '"--bones-from"', '"--min-size"', '"--shard"'):
        assert cli.count(option) == 1, f"cli.py declares {option} {cli.count(option)} times (one decorator)"


def _check_stages(kinds: tuple[str, ...]) -> None:
    code = f"""
from pathlib import Path
from study.demo import BUDGETS, Demo
from study.stages import check_stage
n = 0
for budget in BUDGETS.values():
    for stage in Demo(Path('/nonexistent/demo'), budget).all_stages():
        if stage.kind in {kinds!r}:
            check_stage(stage.kind, stage.params)
            check_stage(stage.kind, stage.resumed())
            n += 1
assert n > 0, n
print(n)
"""
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, encoding="utf-8",
                          errors="replace", timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_every_demo_stage_builds_its_library_options():
    # one process per framework, as in the demo itself
    _check_stages(("phantom", "split", "analyze"))
    _check_stages(("train", "predict", "gradcam", "export"))
    _check_stages(("nnunet-train", "nnunet-predict"))

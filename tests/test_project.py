"""Properties of the project as a whole: dvc.yaml deps are complete, imports have no cycle
and go one way, params.yaml hides no default, dvc.yaml's paths are the layout's.

These read the source and ``dvc.yaml`` (through DVC's own index); nothing runs.
"""

from __future__ import annotations

import ast
import re
import shlex
import subprocess
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("matting_core", "matting_pipeline", "stages", "flows")
# who may import whom (a package imports itself and the ones listed)
LAYERS = {
    "matting_core": set(),
    "matting_pipeline": {"matting_core"},
    "stages": {"matting_pipeline", "matting_core"},
    "flows": {"stages", "matting_pipeline", "matting_core"},
}


# --------------------------------------------------------------------- import graph


def module_file(module: str, root: Path = REPO) -> Path | None:
    """The file of a project module (``a.b`` -> ``a/b.py`` or ``a/b/__init__.py``), None if not ours."""
    if module.split(".")[0] not in PACKAGES:
        return None
    base = root.joinpath(*module.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def file_module(path: Path, root: Path = REPO) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, root: Path = REPO) -> set[str]:
    """Project modules ``path`` imports anywhere in its body (function-level imports too).

    ``from a.b import c`` counts ``a.b.c`` when that is a module, else ``a.b``; importing
    ``a.b.c`` also imports the packages ``a`` and ``a.b`` (their ``__init__``), except this
    module's own parent packages, which are always loaded before it.
    """
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    this = file_module(path, root)
    parents = {".".join(this.split(".")[:i]) for i in range(1, this.count(".") + 1)}
    found: set[str] = set()
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                package = this.split(".") if path.name == "__init__.py" else this.split(".")[:-1]
                package = package[: len(package) - (node.level - 1)]
                base = ".".join(package + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            names = [base] + [f"{base}.{alias.name}" for alias in node.names]
        for name in names:
            parts = name.split(".")
            for i in range(1, len(parts) + 1):
                prefix = ".".join(parts[:i])
                implied = i < len(parts) and prefix in parents
                if module_file(prefix, root) is not None and not implied:
                    found.add(prefix)
    found.discard(this)
    return found


def import_graph(root: Path = REPO) -> dict[str, set[str]]:
    graph = {}
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            graph[file_module(path, root)] = imports_of(path, root)
    return graph


def closure(module: str, graph: dict[str, set[str]]) -> set[str]:
    seen, todo = {module}, [module]
    while todo:
        for dep in graph.get(todo.pop(), ()):
            if dep not in seen:
                seen.add(dep)
                todo.append(dep)
    return seen


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a list of modules (first == last), or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                return stack[stack.index(dep):] + [dep]
            if dep not in state:
                cycle = visit(dep)
                if cycle:
                    return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    bad = []
    for module, deps in graph.items():
        top = module.split(".")[0]
        for dep in deps:
            other = dep.split(".")[0]
            if other != top and other not in LAYERS[top]:
                bad.append(f"{module} imports {dep}")
            if top == "stages" and other == "stages" and module != "stages" and dep != "stages":
                bad.append(f"{module} imports another stage module {dep}")
    return sorted(bad)


# ------------------------------------------------------------------------ dvc.yaml


def stage_instances(root: Path = REPO) -> list:
    """Every pipeline stage instance of the project as DVC resolves dvc.yaml."""
    from dvc.repo import Repo
    from dvc.stage import PipelineStage

    with Repo(str(root)) as repo:
        return [s for s in repo.index.stages if isinstance(s, PipelineStage)]


def command_module(cmd: str) -> str:
    argv = shlex.split(cmd)
    assert argv[:2] == ["python", "-m"], f"stage command {cmd!r} is not `python -m <module> ...`"
    return argv[2]


def missing_deps(stage, graph: dict[str, set[str]], root: Path = REPO) -> list[str]:
    """Project files the stage's command imports that no dep of the stage covers."""
    deps = [Path(d.def_path) for d in stage.deps]
    files = sorted(
        str(module_file(m, root).relative_to(root)) for m in closure(command_module(stage.cmd), graph)
    )
    return [f for f in files if not any(Path(f) == d or d in Path(f).parents for d in deps)]


@pytest.fixture(scope="module")
def stages():
    return stage_instances()


@pytest.fixture(scope="module")
def graph():
    return import_graph()


def test_every_stage_depends_on_every_project_file_its_command_imports(stages, graph):
    assert len(stages) >= 10
    missing = {s.addressing: missing_deps(s, graph) for s in stages}
    missing = {k: v for k, v in missing.items() if v}
    assert not missing, f"dvc.yaml deps miss files the stage commands import: {missing}"


def test_the_deps_check_would_catch_a_missing_dep(tmp_path, graph):
    """The check itself on a stage whose deps list only its own module (today's main had 196 misses)."""

    class FakeDep:
        def __init__(self, path):
            self.def_path = path

    class FakeStage:
        cmd = "python -m stages.teacher --params params.yaml --seg 1 --mat 1"
        deps = [FakeDep("stages/teacher.py"), FakeDep("matting_core")]

    missing = missing_deps(FakeStage(), graph)
    assert "matting_pipeline/trainer.py" in missing and "matting_pipeline/jobs.py" in missing
    assert not any(m.startswith("matting_core/") for m in missing)


def test_no_import_cycle(graph):
    assert find_cycle(graph) is None, f"import cycle: {' -> '.join(find_cycle(graph))}"


def test_cycle_finder_finds_a_hidden_function_level_cycle(tmp_path):
    """A cycle hidden by function-level imports (like stages.method <-> stages.teacher before) is found."""
    pkg = tmp_path / "stages"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("def f():\n    from stages.b import g\n    return g\n")
    (pkg / "b.py").write_text("def g():\n    from stages import a\n    return a\n")
    graph = {file_module(p, tmp_path): imports_of(p, tmp_path) for p in pkg.glob("*.py")}
    cycle = find_cycle(graph)
    assert cycle is not None and set(cycle) == {"stages.a", "stages.b"}
    assert upward_imports(graph) == ["stages.a imports another stage module stages.b",
                                     "stages.b imports another stage module stages.a"]


def test_imports_go_one_way_and_stages_never_import_each_other(graph):
    assert upward_imports(graph) == []


def test_stages_holds_only_the_dvc_stage_modules(stages):
    modules = {command_module(s.cmd) for s in stages}
    files = {f"stages.{p.stem}" for p in (REPO / "stages").glob("*.py") if p.name != "__init__.py"}
    assert files == modules, f"stages/ should hold exactly the modules dvc.yaml runs: extra {files - modules}"


# ------------------------------------------------------------------------ params.yaml


def schema_keys(model, prefix: str = "") -> list[str]:
    """Dotted names of every field of a pydantic model, recursing into sub-sections."""
    from pydantic import BaseModel

    keys = []
    for name, field in model.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            keys += schema_keys(annotation, f"{prefix}{name}.")
        else:
            keys.append(f"{prefix}{name}")
    return keys


def hidden_defaults(raw: dict, model=None) -> list[str]:
    """Schema fields that ``raw`` (a loaded params file) does not set: defaults only the code knows."""
    from matting_pipeline.config import Params

    missing = []
    for key in schema_keys(model or Params):
        node = raw
        for part in key.split("."):
            if not isinstance(node, dict) or part not in node:
                missing.append(key)
                break
            node = node[part]
    return missing


@pytest.mark.parametrize("name", ["params.yaml", "params-cpu.yaml", "params-gpu-check.yaml", "params-paper.yaml"])
def test_params_files_state_every_parameter(name):
    raw = yaml.safe_load((REPO / name).read_text(encoding="utf-8"))
    assert hidden_defaults(raw) == [], f"{name} leaves these to defaults in matting_pipeline/config.py"


def test_hidden_default_check_names_a_missing_key():
    raw = yaml.safe_load((REPO / "params.yaml").read_text(encoding="utf-8"))
    del raw["train"]["teacher"]["scale_range"]
    del raw["evaluate"]
    missing = hidden_defaults(raw)
    assert "train.teacher.scale_range" in missing and "evaluate.short_side" in missing


# ------------------------------------------------------------------------ layout


def expected_outs(stage, params) -> list[str]:
    """The outs (and metrics) of a stage instance, from matting_pipeline.layout."""
    from matting_pipeline.layout import Layout

    argv = shlex.split(stage.cmd)
    args = {argv[i][2:]: argv[i + 1] for i in range(3, len(argv) - 1) if argv[i].startswith("--")}
    layout = Layout() if "seed" not in args else Layout().for_seed(int(args["seed"]))
    group = stage.name.partition("@")[0]
    seg, mat = int(args.get("seg", 0)), int(args.get("mat", 0))
    method = args.get("method")
    if method:
        seg, mat = params.comparison_cell()
    paths = {
        "ingest": [layout.ingest_dir],
        "shard": [layout.shards_root],
        "composite": [layout.composite_root],
        "pretrain": [layout.model_path("pretrain", seg)],
        "teacher_scratch": [layout.model_path("teacher", seg, mat)],
        "teacher": [layout.model_path("teacher", seg, mat)],
        "pseudolabel": [layout.pseudolabel_dir(seg, mat)],
        "student": [layout.model_path("student", seg, mat)],
        "control": [layout.model_path("control", seg)],
        "evaluate_seg_only": [layout.cell_eval_dir(seg, mat), layout.cell_metrics(seg, mat)],
        "evaluate_mat_only": [layout.cell_eval_dir(seg, mat), layout.cell_metrics(seg, mat)],
        "evaluate": [layout.cell_eval_dir(seg, mat), layout.cell_metrics(seg, mat)],
        "method": [layout.method_dir(method, seg, mat) / "model.pt"] if method else [],
        "evaluate_method": [layout.method_eval_dir(method), layout.method_metrics(method)] if method else [],
        "report": [layout.reports],
    }[group]
    return sorted(str(p) for p in paths)


def test_dvc_yaml_outs_are_the_layout_paths(stages):
    from matting_pipeline.config import load_params

    params = load_params(REPO / "params.yaml")
    wrong = {}
    for stage in stages:
        got = sorted(o.def_path for o in stage.outs)
        want = expected_outs(stage, params)
        if got != want:
            wrong[stage.addressing] = (got, want)
    assert not wrong, f"dvc.yaml outs differ from matting_pipeline.layout: {wrong}"


def test_paths_are_not_typed_inline_in_stages():
    """Stage modules get their paths from the layout, not from string literals."""
    pattern = re.compile(r"""/ ["'](shards|composite|pseudolabels|pretrain|teacher|student|methods|ingest)["']""")
    offenders = []
    for path in sorted((REPO / "stages").glob("*.py")):
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if pattern.search(line):
                offenders.append(f"{path.name}:{number}: {line.strip()}")
    assert offenders == []


def test_every_training_and_evaluation_stage_runs_once_per_seed(tmp_path):
    """study.seeds expands every per-seed stage; the data stages and the report stay single."""
    import shutil

    import yaml
    from dvc.repo import Repo

    shutil.copy(REPO / "dvc.yaml", tmp_path / "dvc.yaml")
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["study"].update(seg=[60, 240], mat=[8], seeds=[0, 3])
    params["methods"].update(compare=["dim"], cell=[240, 8])
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    Repo.init(str(tmp_path), no_scm=True)
    with Repo(str(tmp_path)) as repo:
        names = sorted(s.name for s in repo.index.stages)
    per_seed = {"pretrain": ["60", "240"], "control": ["60", "240"], "teacher_scratch": ["8"],
                "teacher": ["60-8", "240-8"], "pseudolabel": ["60-8", "240-8"], "student": ["60-8", "240-8"],
                "evaluate_seg_only": ["60", "240"], "evaluate_mat_only": ["8"], "evaluate": ["60-8", "240-8"],
                "method": ["dim"], "evaluate_method": ["dim"]}
    want = sorted([f"{group}@{item}-{seed}" for group, items in per_seed.items() for item in items
                   for seed in (0, 3)] + ["ingest", "shard", "composite", "report"])
    assert names == want


# ------------------------------------------------------------------------ benchmarks


@pytest.mark.parametrize("script", sorted(p.name for p in (REPO / "benchmarks").glob("bench_*.py")))
def test_every_benchmark_takes_the_quick_flag_make_bench_passes(script):
    """`make bench` runs `<script> --quick` for every benchmark: each must parse it (one did
    not, and stopped `make bench` there) and explain itself with --help."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / script), "--help"], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "--quick" in proc.stdout


def test_ci_entry_point_parses_and_runs_make_test():
    """.ci/run is what CI executes: a syntax error there fails every CI run before a test runs
    (a comment edit once left an unmatched backquote in it)."""
    script = REPO / ".ci" / "run"
    checked = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert checked.returncode == 0, checked.stderr
    commands = [line.strip() for line in script.read_text().splitlines() if line.strip() and not line.lstrip().startswith("#")]
    assert commands[-1] == "make test"

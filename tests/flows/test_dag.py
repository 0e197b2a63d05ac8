"""The task graph comes from DVC's own resolved pipeline; grid, profile and summary rules.

No Prefect server here: these are the pure parts of flows/dag.py and flows/study.py, on the
toy project (real git + DVC) and on this checkout's dvc.yaml.
"""

import subprocess
from pathlib import Path

import pytest
import yaml

from flows.dag import StageNode, StageReport, failure_message, load_pipeline, select_stages, summary_markdown
from flows.study import PROJECT_ROOT, StudySetupError, activate_profile, profile_params, resolve_grid
from flows.toy import make_toy_project, max_overlap
from matting_pipeline.config import load_params

# DVC 3.67 itself trips a pygtrie deprecation on every graph build; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:dvc")


@pytest.fixture(scope="module")
def shared_toy(tmp_path_factory):
    """One toy project for the tests that only read it (tests that edit it use `toy`)."""
    return make_toy_project(tmp_path_factory.mktemp("shared") / "toy")


def test_graph_is_dvcs_own(shared_toy):
    nodes = load_pipeline(shared_toy)
    assert list(nodes) == [
        "ingest", "pretrain@1", "pretrain@2", "teacher_scratch@3", "teacher_scratch@4",
        "teacher@1-3", "teacher@1-4", "teacher@2-3", "teacher@2-4", "report",
    ]
    assert nodes["ingest"] == StageNode("ingest", "ingest", None, ())
    assert nodes["pretrain@2"].parents == ("ingest",) and nodes["pretrain@2"].cell == (2, 0)
    assert nodes["teacher_scratch@4"].cell == (0, 4)
    assert nodes["teacher@2-3"].parents == ("pretrain@2",) and nodes["teacher@2-3"].cell == (2, 3)
    assert set(nodes["report"].parents) == set(nodes) - {"ingest", "report"}
    assert nodes["teacher@2-3"].label == "teacher seg2-mat3"
    assert nodes["pretrain@1"].label == "pretrain seg1-mat0"
    assert nodes["report"].label == "report"


def test_graph_follows_dvc_yaml_edits(toy):
    # A new budget in params.yaml is a new matrix instance, with no change to flows/.
    params = yaml.safe_load((toy / "params.yaml").read_text())
    params["study"]["mat"] = [3, 4, 5]
    (toy / "params.yaml").write_text(yaml.safe_dump(params))
    nodes = load_pipeline(toy)
    assert {"teacher@1-5", "teacher@2-5", "teacher_scratch@5"} <= set(nodes)
    assert nodes["teacher@2-5"].parents == ("pretrain@2",)


@pytest.mark.parametrize(
    ("cells", "expected"),
    [
        ([(1, 3)], ["ingest", "pretrain@1", "teacher@1-3"]),
        ([(0, 4)], ["ingest", "teacher_scratch@4"]),
        ([(2, 0)], ["ingest", "pretrain@2"]),
        (
            [(0, 3), (0, 4), (1, 0), (1, 3), (1, 4)],  # seg [1] x mat [3, 4]: no report, no seg 2
            ["ingest", "pretrain@1", "teacher_scratch@3", "teacher_scratch@4", "teacher@1-3", "teacher@1-4"],
        ),
    ],
)
def test_selection_is_the_cells_and_their_ancestors(shared_toy, cells, expected):
    assert select_stages(load_pipeline(shared_toy), cells) == expected


def test_whole_grid_selects_every_stage_report_last(shared_toy):
    nodes = load_pipeline(shared_toy)
    cells = load_params(shared_toy / "params.yaml").study.cells()
    selected = select_stages(nodes, cells)
    assert selected == list(nodes) and selected[-1] == "report"


def test_real_dvc_yaml_is_covered():
    """This checkout's dvc.yaml: every stage instance is reached by the whole grid, each grid
    instance has a cell of the params grid, and parents come before children."""
    nodes = load_pipeline(PROJECT_ROOT)
    study = load_params(PROJECT_ROOT / "params.yaml").study
    assert set(select_stages(nodes, study.cells())) == set(nodes)
    cells = {node.cell for node in nodes.values() if node.cell is not None}
    assert cells <= set(study.cells())
    position = {name: i for i, name in enumerate(nodes)}
    for name, node in nodes.items():
        assert all(position[p] < position[name] for p in node.parents), name
    for s in study.seg:
        for m in study.mat:
            for k in study.seeds:
                teacher = nodes[f"teacher@{s}-{m}-{k}"]
                assert teacher.cell == (s, m) and teacher.seed == k and f"pretrain@{s}-{k}" in teacher.parents
                assert f"control@{s}-{k}" in nodes[f"evaluate@{s}-{m}-{k}"].parents


def test_grid_must_be_inside_the_params_grid(shared_toy):
    params = load_params(shared_toy / "params.yaml")
    assert resolve_grid(params, None, None).cells() == params.study.cells()
    assert resolve_grid(params, [2], [3]).cells() == [(0, 3), (2, 0), (2, 3)]
    with pytest.raises(StudySetupError, match=r"seg budget\(s\) \[5\] have no DVC stages"):
        resolve_grid(params, [1, 5], None)
    with pytest.raises(StudySetupError, match="non-zero"):
        resolve_grid(params, [0, 1], None)


def test_paper_profile_missing_is_a_clear_error(shared_toy):
    with pytest.raises(StudySetupError, match=r"profile 'paper' reads params-paper.yaml, which does not exist"):
        profile_params(shared_toy, "paper")
    with pytest.raises(StudySetupError, match="unknown profile"):
        profile_params(shared_toy, "huge")


def test_paper_profile_becomes_params_yaml_only_when_clean(toy):
    paper = yaml.safe_load((toy / "params.yaml").read_text())
    paper["orchestration"]["max_concurrency"] = 7
    (toy / "params-paper.yaml").write_text(yaml.safe_dump(paper))
    # Uncommitted edits in params.yaml are never overwritten.
    (toy / "params.yaml").write_text((toy / "params.yaml").read_text() + "# local edit\n")
    with pytest.raises(StudySetupError, match="changes not committed"):
        activate_profile(toy, "paper")
    subprocess.run(["git", "checkout", "params.yaml"], cwd=toy, check=True)
    assert activate_profile(toy, "paper").orchestration.max_concurrency == 7
    assert load_params(toy / "params.yaml").orchestration.max_concurrency == 7
    assert activate_profile(toy, "demo").orchestration.max_concurrency == 7  # demo = params.yaml as it is


def test_invalid_profile_file_names_the_key(toy):
    (toy / "params-paper.yaml").write_text("study:\n  seg: [1]\n  mat: [3]\norchestration:\n  max_concurency: 3\n")
    with pytest.raises(StudySetupError, match=r"orchestration\.max_concurency: unknown key"):
        profile_params(toy, "paper")


def test_summary_lists_failures_first():
    reports = [
        StageReport("ingest", "ingest", None, "Completed", 1, "ran (1.0 s)", node="0123456789abcdef0123"),
        StageReport("teacher@2-4", "teacher seg2-mat4", (2, 4), "Failed", 3, "exit 255: toy | failure"),
        StageReport("report", "report", None, "NotReady", 0, "not run: upstream teacher@2-4 did not complete"),
    ]
    markdown = summary_markdown("study demo", reports)
    table = [line for line in markdown.splitlines() if line.startswith("| ")]
    assert table[1] == "| teacher@2-4 | seg2-mat4 | Failed | 3 | - | exit 255: toy \\| failure |"
    assert table[2].startswith("| report | - | NotReady | 0 | - |")
    assert table[3] == "| ingest | - | Completed | 1 | 0123456789ab | ran (1.0 s) |"  # where it ran
    assert "**1 failed, 1 not run** of 3 stage instances; cells affected: seg2-mat4" in markdown
    message = failure_message(reports)
    assert message.splitlines() == [
        "2 of 3 stage instances did not complete:",
        "- teacher@2-4 [cell seg2-mat4]: Failed after 3 attempt(s): exit 255: toy | failure",
        "- report: not run: upstream teacher@2-4 did not complete",
    ]
    assert failure_message(reports[:1]) is None


def test_max_overlap_counts_running_commands():
    events = [
        {"t": 0, "event": "start"}, {"t": 1, "event": "start"}, {"t": 2, "event": "end"},
        {"t": 2, "event": "start"}, {"t": 3, "event": "end"}, {"t": 4, "event": "end"},
    ]
    assert max_overlap(events) == 2
    assert max_overlap([]) == 0


def test_paths_are_relative_to_the_project(toy, monkeypatch, tmp_path):
    # Loading from another working directory still yields names `dvc repro` takes in root.
    monkeypatch.chdir(tmp_path)
    assert "teacher@1-3" in load_pipeline(Path("toy"))


def test_a_per_seed_stage_instance_is_labelled_with_its_seed():
    from flows.graph import StageNode

    node = StageNode("teacher@2-3-1", "teacher", (2, 3), ("pretrain@2-1",), seed=1)
    assert node.label == "teacher seg2-mat3 seed1"
    assert StageNode("teacher@2-3", "teacher", (2, 3), ()).label == "teacher seg2-mat3"


def test_ray_resources_per_stage_and_gpus_only_on_a_gpu_cluster():
    from flows.dag import _stage_resources
    from matting_pipeline.config import parse_params

    table = parse_params({"orchestration": {"resources": {"default": {"num_cpus": 0.5},
                                                          "teacher": {"num_cpus": 2, "num_gpus": 1}}}}).orchestration.resources
    assert _stage_resources(table, "teacher", gpus=True) == {"num_cpus": 2.0, "num_gpus": 1.0}
    assert _stage_resources(table, "teacher", gpus=False) == {"num_cpus": 2.0}  # a CPU cluster could never place it
    assert _stage_resources(table, "report", gpus=True) == {"num_cpus": 0.5}  # not named: the default
    assert _stage_resources(None, "ingest", gpus=True) == {"num_cpus": 1.0}


def test_an_unknown_runner_is_refused_before_anything_runs(tmp_path):
    from flows.study import main

    with pytest.raises(SystemExit):
        main(["--runner", "slurm", "--root", str(tmp_path)])


def test_an_unreachable_ray_address_fails_in_seconds_naming_the_fix():
    import socket
    import time

    from flows.dag import RayUnreachable, probe_ray_address

    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    started = time.monotonic()
    with pytest.raises(RayUnreachable, match=r"ray start --head"):
        probe_ray_address(f"127.0.0.1:{port}")
    with pytest.raises(RayUnreachable, match="ray start --head"):
        probe_ray_address(f"ray://127.0.0.1:{port}")
    assert time.monotonic() - started < 10
    with pytest.raises(RayUnreachable, match="host:port"):
        probe_ray_address("head-node")
    with socket.socket() as listening:
        listening.bind(("127.0.0.1", 0))
        listening.listen()
        probe_ray_address(f"127.0.0.1:{listening.getsockname()[1]}")  # answers: fine
    probe_ray_address(None)
    probe_ray_address("auto")

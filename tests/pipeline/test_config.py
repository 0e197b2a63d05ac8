"""params.yaml schema: typos and bad types fail at load with the key's name."""

from pathlib import Path

import pytest
import yaml

from matting_pipeline.config import ConfigError, load_params, parse_params

REPO = Path(__file__).resolve().parents[2]


def test_repo_params_yaml_is_valid():
    params = load_params(REPO / "params.yaml")
    assert params.train.teacher.lambda_boundary == 0.1 and params.train.teacher.boundary_pos_weight == 8.0
    assert 0 not in params.study.seg and 0 not in params.study.mat
    assert params.composite.background_scale == (1.0, 1.5)


def test_unknown_key_is_named():
    with pytest.raises(ConfigError, match=r"train\.teacher\.lamda_boundary: unknown key"):
        parse_params({"train": {"teacher": {"iters": 5, "lr": 1e-4, "lamda_boundary": 0.1}}})


def test_wrong_type_is_named():
    with pytest.raises(ConfigError, match=r"train\.pretrain\.iters"):
        parse_params({"train": {"pretrain": {"iters": "many", "lr": 1e-4}}})


def test_yaml_exponent_without_dot_still_reads_as_float(tmp_path):
    # YAML 1.1 reads `1e-4` as a string; users write it anyway.
    path = tmp_path / "params.yaml"
    path.write_text("train:\n  teacher:\n    iters: 3\n    lr: 1e-4\n")
    assert load_params(path).train.teacher.lr == pytest.approx(1e-4)


def test_folders_source_requires_paths():
    with pytest.raises(ConfigError, match=r"data\.seg_dir"):
        parse_params({"data": {"source": "folders", "matte_dir": "a", "background_dir": "b"}})


def test_budgets_must_ascend():
    with pytest.raises(ConfigError, match=r"study\.mat"):
        parse_params({"study": {"mat": [200, 50]}})


def test_zero_budget_is_implicit():
    with pytest.raises(ConfigError, match=r"study\.seg: .*non-zero"):
        parse_params({"study": {"seg": [0, 2000]}})


def test_grid_cells_skip_origin():
    study = parse_params({"study": {"seg": [2000, 5000], "mat": [50]}}).study
    assert study.cells() == [(0, 50), (2000, 0), (2000, 50), (5000, 0), (5000, 50)]
    paper = parse_params(
        {"study": {"seg": [2000, 5000, 10000, 20000, 50000], "mat": [50, 200, 500, 1000, 2000]}}
    ).study
    assert len(paper.cells()) == 35


def test_missing_file_names_path(tmp_path):
    with pytest.raises(ConfigError, match="nope.yaml: not found"):
        load_params(tmp_path / "nope.yaml")


def test_non_mapping_top_level(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump([1, 2]))
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_params(path)


def _dotted_keys(mapping: dict, prefix: str = "") -> set[str]:
    keys = set()
    for key, value in mapping.items():
        keys.add(prefix + key)
        if isinstance(value, dict) and key != "val":
            keys |= _dotted_keys(value, f"{prefix}{key}.")
    return keys


def test_paper_profile_is_the_35_cell_study_and_declares_every_dvc_param():
    paper = load_params(REPO / "params-paper.yaml")
    assert len(paper.study.cells()) == 35
    assert paper.train.pretrain.iters == 200_000 and paper.train.pretrain.lr == pytest.approx(1e-4)
    assert paper.train.teacher.iters == 10_000 and paper.train.student.iters == 20_000
    assert paper.evaluate.short_side == 512
    # dvc.yaml declares params by key; DVC fails on a key missing from the params file.
    demo_keys = _dotted_keys(yaml.safe_load((REPO / "params.yaml").read_text()))
    paper_keys = _dotted_keys(yaml.safe_load((REPO / "params-paper.yaml").read_text()))
    assert demo_keys <= paper_keys


def test_study_seeds_and_the_loss_knobs_are_validated():
    params = parse_params({"study": {"seeds": [0, 2, 5]}})
    assert params.study.seeds == [0, 2, 5] and params.study.bootstrap == 2000
    for bad in ([], [1, 0], [0, 0], [-1]):
        with pytest.raises(ConfigError, match="study.seeds"):
            parse_params({"study": {"seeds": bad}})
    teacher = parse_params({"train": {"teacher": {"iters": 5, "lr": 1e-3, "matte_loss": "l1",
                                                  "boundary_pos_weight": 8, "boundary_head_lr": 10,
                                                  "single_person": True}}}).train.teacher
    assert (teacher.matte_loss, teacher.boundary_pos_weight, teacher.boundary_head_lr, teacher.single_person) == (
        "l1", 8.0, 10.0, True)
    with pytest.raises(ConfigError, match="train.student.matte_loss"):
        parse_params({"train": {"student": {"iters": 5, "lr": 1e-3, "matte_loss": "huber"}}})
    with pytest.raises(ConfigError, match="train.teacher.boundary_pos_weight"):
        parse_params({"train": {"teacher": {"iters": 5, "lr": 1e-3, "boundary_pos_weight": 0}}})
    with pytest.raises(ConfigError, match="train.student.single_person"):  # a teacher-only knob
        parse_params({"train": {"student": {"iters": 5, "lr": 1e-3, "single_person": True}}})
    assert parse_params({"model": {"backbone_weights": "w.pth"}}).model.backbone_weights == "w.pth"


@pytest.mark.parametrize("name, seeds", [("params-cpu.yaml", [0, 1, 2]), ("params-gpu-check.yaml", [0, 1])])
def test_profiles_parse_and_have_several_seeds(name, seeds):
    params = load_params(REPO / name)
    assert params.study.seeds == seeds and 0 not in params.study.seg


def test_orchestration_runner_and_resources():
    params = parse_params({"orchestration": {"runner": "ray", "resources": {"teacher": {"num_cpus": 2, "num_gpus": 1}}}})
    orch = params.orchestration
    assert orch.runner == "ray" and orch.ray_address is None
    # a table of one's own keeps 'default' for every stage it does not name
    assert orch.resources["teacher"].num_gpus == 1 and orch.resources["default"].num_cpus == 1
    assert parse_params({}).orchestration.resources["student"].num_gpus == 1  # training takes a GPU where there is one
    with pytest.raises(ConfigError, match="teachr"):
        parse_params({"orchestration": {"resources": {"teachr": {"num_cpus": 1}}}})
    with pytest.raises(ConfigError, match="runner"):
        parse_params({"orchestration": {"runner": "slurm"}})
    with pytest.raises(ConfigError, match="num_cpus"):
        parse_params({"orchestration": {"resources": {"default": {"num_cpus": 0}}}})

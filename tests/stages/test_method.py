"""The related methods in the pipeline: stages.method, the teacher switch, evaluate, predict, report.

Tiny real shards (the writer, FORMATS.md layout), a real sqlite MLflow store, CPU, the
×0.25 network at 32 px crops. Each method trains a few steps through the shared loop and
loads back through ``load_model``; evaluation picks each method's guidance; ``matting
predict`` takes ``--trimap/--mask/--box/--point``; the report shows the method rows.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient
from PIL import Image

from matting_core import report as core
from matting_core.checkpoint import load_model, read_checkpoint
from matting_core.methods import METHODS, get_method, predict_image
from matting_core.metrics import evaluate_alpha
from matting_core.regions import eval_trimap
from matting_pipeline import tracking
from matting_pipeline.layout import Layout
from stages import evaluate, method, pretrain, pseudolabel, student, teacher
from stages import report as report_stage
from matting_pipeline.cli import main
from matting_pipeline.config import COMPARED_METHODS, ConfigError, parse_params
from matting_pipeline.shards import subset_keys, write_shard_set
from matting_pipeline.cli import StageError
from matting_pipeline.trainer import apply_train_settings, train
from tests.images import save
from tests.stages.test_training import MAT, SEG, SIZE, _disc, make_data

CPU = torch.device("cpu")
NETWORK = "unet_r18x0.25"
EXPERIMENT = "test-methods"
ITERS = 4
COMPARED = ["dim", "adamatting", "mgm", "mgm_wild", "mam"]


def make_params(**overrides) -> dict:
    step = {"iters": 2, "lr": 1.0e-3, "batch_size": 2, "crop": 32, "checkpoint_every": 2, "log_every": 1}
    raw = {
        "model": {"network": NETWORK},
        "train": {"device": "cpu", "num_workers": 0, "pretrain": dict(step), "teacher": dict(step),
                  "student": dict(step)},
        "evaluate": {"short_side": SIZE, "save_predictions": 1, "fps_size": 32, "fps_iters": 1},
        "study": {"experiment": EXPERIMENT, "seg": [SEG], "mat": [MAT]},
        "methods": {"compare": COMPARED, "cell": [SEG, MAT], "iters": ITERS},
    }
    for key, value in overrides.items():
        raw[key] = value
    return raw


def make_valsets(data: Path) -> None:
    """val-natural (image, alpha) and val-withtrimap (image, alpha, trimap), 3 samples each."""
    rng = np.random.default_rng(7)
    for name, with_trimap in (("natural", False), ("withtrimap", True)):
        samples = []
        for i in range(3):
            alpha = _disc(rng, SIZE)
            fg, bg = rng.integers(150, 255, 3), rng.integers(0, 100, (SIZE, SIZE, 3))
            image = np.round(alpha[..., None] * fg + (1 - alpha[..., None]) * bg).astype(np.uint8)
            arrays = {"image": image, "alpha": alpha}
            if with_trimap:  # a deliberately wide unknown band: not what eval_trimap would give
                arrays["trimap"] = eval_trimap(alpha, 9)
            samples.append((f"val-{name}-{i:06d}", {"set": f"val-{name}"}, arrays))
        write_shard_set(data / "shards" / f"val-{name}", f"val-{name}", samples, samples_per_shard=2)


def args_for(world, **kw):
    base = {"params": str(world["params_file"]), "data_root": str(world["data"]),
            "models_root": str(world["models"]), "device": "cpu", "iters": None, "seg": None, "mat": None, "seed": 0}
    base.update(kw)
    return argparse.Namespace(**base)


def run_method(world, name, record=None, fail_at=None, raw=None, **kw):
    params = parse_params(raw or make_params())
    job = apply_train_settings(method.build_job(args_for(world, method=name, **kw), params, CPU), params)  # as the stage

    def on_step(step, batch, terms):
        if record is not None:
            record.append((step, {k: v.detach().clone() for k, v in batch.items()}, {k: float(v) for k, v in terms.items()}))
        if fail_at is not None and step == fail_at:
            raise RuntimeError(f"injected failure at step {step}")

    return job, train(job, CPU, on_step=on_step, progress=False)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("methods")
    make_data(root / "data")
    make_valsets(root / "data")
    (root / "params.yaml").write_text(yaml.safe_dump(make_params()))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
        mp.chdir(root)
        world = {"root": root, "data": root / "data", "models": root / "models", "params_file": root / "params.yaml"}
        params = parse_params(make_params())
        train(pretrain.build_job(args_for(world, seg=SEG, mat=0), params, CPU), CPU, progress=False)
        yield world
    torch.set_num_threads(threads)
    mlflow.set_tracking_uri(None)


@pytest.fixture(scope="module")
def trained(world):
    """Every compared method trained ITERS steps at the comparison cell through stages.method."""
    out = {}
    for name in COMPARED:
        record = []
        job, result = run_method(world, name, record=record)
        out[name] = {"job": job, "result": result, "record": record}
    return out


@pytest.fixture(scope="module")
def evaluated(world, trained):
    """`matting evaluate --method <name>` for every compared method (with MLflow)."""
    common = ["--params", str(world["params_file"]), "--data-root", str(world["data"]), "--models-root",
              str(world["models"]), "--metrics-dir", str(world["root"] / "metrics"), "--eval-root",
              str(world["root"] / "eval"), "--device", "cpu"]
    for name in COMPARED:
        assert main(["evaluate", "--method", name, *common]) == 0
    return {name: json.loads((world["root"] / "metrics" / "seed0" / "methods" / f"{name}.json").read_text())
            for name in COMPARED}


# ----------------------------------------------------------------------------- config


def test_params_schema_of_the_methods():
    assert set(METHODS) - {"mlb"} == set(COMPARED_METHODS)
    params = parse_params(make_params())
    assert params.method == "mlb" and params.comparison_cell() == (SEG, MAT)
    assert parse_params({"study": {"seg": [5, 9], "mat": [2, 4]}}).comparison_cell() == (9, 4)  # default: largest
    with pytest.raises(ConfigError, match=r"methods.cell \[0, 3\] must be a cell of the grid"):
        parse_params(make_params(methods={"cell": [0, MAT]}))
    with pytest.raises(ConfigError, match="methods.compare.0"):
        parse_params(make_params(methods={"compare": ["mlb"]}))
    with pytest.raises(ConfigError, match=r"methods.mam: segmenter 'sam' needs sam_checkpoint"):
        parse_params(make_params(methods={"mam": {"segmenter": "sam"}}))
    with pytest.raises(ConfigError, match=r"^.*\n  method: Input should be"):
        parse_params(make_params(method="modnet"))


def test_repo_params_and_dvc_stages_of_the_comparison():
    repo = Path(__file__).resolve().parents[2]
    from matting_pipeline.config import load_params

    params = load_params(repo / "params.yaml")
    dvc = yaml.safe_load((repo / "dvc.yaml").read_text())["stages"]
    assert dvc["method"]["matrix"]["method"] == "${methods.compare}"
    assert "--method ${item.method}" in dvc["method"]["cmd"] and "stages.method" in dvc["method"]["cmd"]
    assert dvc["method"]["matrix"]["seed"] == "${study.seeds}" and "--seed ${item.seed}" in dvc["method"]["cmd"]
    assert ("models/seed${item.seed}/methods/${item.method}/seg${methods.cell[0]}-mat${methods.cell[1]}/model.pt"
            in dvc["method"]["outs"])
    assert "stages.evaluate" in dvc["evaluate_method"]["cmd"]
    assert dvc["evaluate_method"]["metrics"] == [{"metrics/seed${item.seed}/methods/${item.method}.json": {"cache": False}}]
    assert params.methods.cell is not None and params.methods.cell[0] > 0  # DVC interpolates it
    assert "method" in dvc["teacher"]["params"] and "method" in dvc["teacher_scratch"]["params"]


# ----------------------------------------------------------------------------- training


@pytest.mark.parametrize("name", COMPARED)
def test_each_method_trains_and_loads_back(world, trained, name):
    got = trained[name]
    result, record = got["result"], got["record"]
    assert [s for s, _, _ in record] == list(range(1, ITERS + 1))
    assert all(np.isfinite(t["total"]) for _, _, t in record)
    path = world["models"] / "seed0" / "methods" / name / f"seg{SEG}-mat{MAT}" / "model.pt"
    assert result["model_path"] == path and not (path.parent / "state.pt").exists()
    model, info = load_model(path)
    assert info["network_spec"]["method"] == name and info["network_spec"]["name"] == NETWORK
    assert info["extra"]["stage"] == "method" and info["extra"]["method"] == name and info["extra"]["step"] == ITERS
    assert torch.load(path, weights_only=True)["format"] == "matting-model"
    trained_state = got["job"].model.state_dict()
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, trained_state[key].cpu())
    # the method's guidance is in every batch, made from the cropped GT alpha
    kind = get_method(name).required_input
    batch = record[0][1]
    assert {"image", "alpha", "fg", "bg", kind} <= set(batch)
    if kind == "prompt":
        assert batch["prompt"].shape == (2, 5) and set(batch["prompt"][:, 0].tolist()) <= {0.0, 1.0}
    else:
        assert batch[kind].shape == batch["alpha"].shape
    # initialised from the seg-pretrained network of the cell
    assert got["job"].run_params["init_from"].endswith(f"pretrain/seg{SEG}/model.pt")


def test_mlflow_runs_are_nested_under_the_cell_with_the_method(world, trained):
    client = MlflowClient()
    cell_run = tracking.get_or_create_cell_run(EXPERIMENT, SEG, MAT, NETWORK)
    for name, got in trained.items():
        run = client.get_run(got["result"]["run_id"])
        assert run.data.tags["mlflow.parentRunId"] == cell_run
        assert run.data.tags["mlflow.runName"] == f"method-{name}-{NETWORK}-seg{SEG}-mat{MAT}-seed0"
        assert run.data.tags["method"] == name and run.info.status == "FINISHED"
        assert run.data.params["method"] == name and run.data.params["stage"] == "method"
        assert run.data.params["iters"] == str(ITERS)
        history = client.get_metric_history(run.info.run_id, "loss/total")
        assert sorted(m.step for m in history) == list(range(1, ITERS + 1))
    params = client.get_run(trained["mam"]["result"]["run_id"]).data.params
    assert params["mam.point_prob"] == "0.25" and params["mam.eval_box_margin"] == "0.05"
    assert client.get_run(trained["dim"]["result"]["run_id"]).data.params["dim.phase_fractions"] == "0.5,0.25"
    # AdaMatting's learned log-variances are logged as they evolve
    ada = trained["adamatting"]
    history = client.get_metric_history(ada["result"]["run_id"], "loss/log_var_trimap")
    values = [m.value for m in sorted(history, key=lambda m: m.step)]
    assert len(values) == ITERS and values[-1] != values[0]
    np.testing.assert_allclose(values, [t["log_var_trimap"] for _, _, t in ada["record"]], rtol=1e-6)
    # DIM's phases run in order over the run (50 % / 25 % / rest of 4 steps)
    assert [t["phase"] for _, _, t in trained["dim"]["record"]] == [0.0, 0.0, 1.0, 2.0]


def test_mam_segmenter_is_the_pretrained_network_and_stays_frozen(world, trained):
    pre, _ = load_model(world["models"] / "seed0" / "pretrain" / f"seg{SEG}" / "model.pt")
    model = trained["mam"]["job"].model
    for key, value in pre.state_dict().items():
        torch.testing.assert_close(model.segmenter.network.state_dict()[key].cpu(), value)
    m2m_before = trained["mam"]["job"].optimizer_parameters()
    assert not any(p is q for p in m2m_before for q in model.segmenter.parameters())


def test_mgm_wild_self_trains_on_the_seg_subset(world, trained):
    got = trained["mgm_wild"]
    batch = got["record"][0][1]
    assert {"natural_image", "natural_image_strong", "natural_mask"} <= set(batch)
    assert (batch["natural_image_strong"] - batch["natural_image"]).abs().mean() > 1e-3
    assert set(torch.unique(batch["natural_mask"]).tolist()) <= {0.0, 1.0}
    assert got["job"].aux_dataset.reader.keys == subset_keys(world["data"] / "shards" / "seg", SEG)
    unsup = [t["unsupervised"] for _, _, t in got["record"]]
    assert unsup[0] == 0 and all(u > 0 for u in unsup[1:])  # from 25 % of the run on
    assert "self_training" in got["job"].run_params and got["job"].run_params["self_training"] != "off"


def test_mgm_wild_resume_restores_the_ema_teacher_and_the_natural_stream(world, trained, tmp_path):
    raw = make_params(methods={"compare": COMPARED, "cell": [SEG, MAT], "iters": 4})
    straight, first, second = [], [], []
    for root in ("straight", "models"):  # the seg-pretrained start, in two fresh models roots
        (tmp_path / root / "seed0" / "pretrain").mkdir(parents=True)
        (tmp_path / root / "seed0" / "pretrain" / f"seg{SEG}").symlink_to(
            world["models"] / "seed0" / "pretrain" / f"seg{SEG}")
    _, _ = run_method(world, "mgm_wild", record=straight, raw=raw, models_root=str(tmp_path / "straight"))
    models = tmp_path / "models"
    with pytest.raises(RuntimeError, match="injected failure at step 3"):
        run_method(world, "mgm_wild", record=first, fail_at=3, raw=raw, models_root=str(models))
    state = models / "seed0" / "methods" / "mgm_wild" / f"seg{SEG}-mat{MAT}" / "state.pt"
    assert read_checkpoint(state)["step"] == 2 and "loss" in read_checkpoint(state)["modules"]
    _, result = run_method(world, "mgm_wild", record=second, raw=raw, models_root=str(models))
    assert result["start_step"] == 2 and [s for s, _, _ in second] == [3, 4]
    np.testing.assert_allclose([t["total"] for _, _, t in second], [t["total"] for _, _, t in straight[2:]], rtol=1e-5)
    torch.testing.assert_close(second[0][1]["natural_image"], straight[2][1]["natural_image"])


def test_teacher_stage_trains_the_params_method(world, tmp_path):
    raw = make_params(method="dim")
    params = parse_params(raw)
    models = tmp_path / "models"
    (models / "seed0" / "pretrain").mkdir(parents=True)
    (models / "seed0" / "pretrain" / f"seg{SEG}").symlink_to(world["models"] / "seed0" / "pretrain" / f"seg{SEG}")
    job = teacher.build_job(args_for(world, seg=SEG, mat=MAT, models_root=str(models)), params, CPU)
    result = train(job, CPU, progress=False)
    assert result["model_path"] == models / "seed0" / "teacher" / f"seg{SEG}-mat{MAT}" / "model.pt"
    _, info = load_model(result["model_path"])
    assert info["network_spec"]["method"] == "dim" and info["extra"]["stage"] == "teacher"
    assert "lambda_boundary" not in info["extra"]["hyper"]
    run = MlflowClient().get_run(result["run_id"])
    assert run.data.tags["mlflow.runName"] == f"teacher-dim-{NETWORK}-seg{SEG}-mat{MAT}-seed0"
    # the MLB-only stages refuse, naming what to run instead
    with pytest.raises(StageError, match="method: dim.*Matte Label Blending"):
        student.build_job(args_for(world, seg=SEG, mat=MAT, models_root=str(models)), params, CPU)
    with pytest.raises(pseudolabel.PseudolabelError, match="pseudolabel stage is part of Matte Label Blending"):
        pseudolabel.make_plan(params, SEG, MAT, world["data"], models)
    # evaluate: the cell's primary is that teacher, evaluated with DIM's guidance
    layout = Layout(world["data"], models, tmp_path / "metrics", tmp_path / "eval").for_seed(0)
    result = evaluate.evaluate_cell(params, SEG, MAT, layout,
                                    "cpu")
    assert result["primary"] == "teacher" and list(result["models"]) == ["teacher"]
    teacher_entry = result["models"]["teacher"]
    assert teacher_entry["method"] == "dim"
    assert teacher_entry["sets"]["withtrimap"]["guidance"] == "the set's trimap"


def test_mam_needs_seg_labels_for_its_own_segmenter(world):
    with pytest.raises(StageError, match="mat-only cell"):
        method.build_job(args_for(world, method="mam", seg=0, mat=MAT), parse_params(make_params()), CPU)
    assert main(["method", "--method", "mam", "--seg", "0", "--mat", str(MAT), "--params", str(world["params_file"]),
                 "--data-root", str(world["data"]), "--models-root", str(world["models"]), "--device", "cpu"]) == 2


# ----------------------------------------------------------------------------- evaluate


def test_evaluate_method_writes_metrics_with_each_methods_guidance(world, evaluated):
    for name, result in evaluated.items():
        assert result["method"] == name and result["cell"] == f"seg{SEG}-mat{MAT}"
        assert result["fps"] > 0 and result["params"] > 0 and result["trainable_params"] <= result["params"]
        assert set(result["sets"]) == {"natural", "withtrimap"}
        for summary in result["sets"].values():
            assert summary["n"] == 3 and 0 <= summary["whole"]["mse"] <= 1
        assert (world["root"] / "eval" / "seed0" / "methods" / name / f"{name}-natural.csv").is_file()
    assert evaluated["mam"]["trainable_params"] < evaluated["mam"]["params"]  # the frozen segmenter
    g = {n: r["guidance"] for n, r in evaluated.items()}
    assert g["dim"] == {"natural": "trimap from GT alpha (eval_trimap, 15 px)", "withtrimap": "the set's trimap"}
    assert g["adamatting"]["withtrimap"] == "the set's trimap"
    assert g["mgm"]["natural"] == g["mgm_wild"]["natural"] == "mask 1[GT alpha >= 0.5]"
    assert g["mam"]["natural"] == "box around GT alpha >= 0.5, margin 0.05 x side"
    assert evaluated["mam"]["summary"] == get_method("mam").summary


def _first_row(path: Path) -> dict:
    import csv

    with open(path, newline="") as fh:
        return next(csv.DictReader(fh))


def test_dim_uses_the_sets_trimap_else_eval_trimap(world, evaluated):
    from matting_pipeline.shards import iter_samples

    model, _ = load_model(world["models"] / "seed0" / "methods" / "dim" / f"seg{SEG}-mat{MAT}" / "model.pt")
    for set_name, guidance in (("withtrimap", "set"), ("natural", "gt")):
        sample = next(iter(iter_samples(world["data"] / "shards" / f"val-{set_name}")))
        trimap = sample["trimap"] if guidance == "set" else eval_trimap(sample["alpha"], 15)
        pred = predict_image(model, sample["image"], trimap, short_side=SIZE)
        other = predict_image(model, sample["image"], eval_trimap(sample["alpha"], 3), short_side=SIZE)
        assert np.abs(pred - other).max() > 1e-4  # the trimap matters, so the check below is meaningful
        row = _first_row(world["root"] / "eval" / "seed0" / "methods" / "dim" / f"dim-{set_name}.csv")
        expected = evaluate_alpha(pred, sample["alpha"], trimap=sample.get("trimap"))
        assert float(row["whole/mse"]) == pytest.approx(float(expected["whole"]["mse"]), rel=1e-5, abs=1e-9)


def test_evaluate_method_metrics_reach_the_methods_mlflow_run(world, trained, evaluated):
    client = MlflowClient()
    for name in ("dim", "mam"):
        run = client.get_run(trained[name]["result"]["run_id"])
        assert run.data.metrics["natural/whole/mse"] == pytest.approx(evaluated[name]["sets"]["natural"]["whole"]["mse"])
        assert run.data.metrics["fps"] == pytest.approx(evaluated[name]["fps"])
        assert any(a.path == "evaluation" for a in client.list_artifacts(run.info.run_id))


def test_evaluate_cli_still_needs_a_cell_without_method(world, capsys):
    assert main(["evaluate", "--params", str(world["params_file"]), "--seg", str(SEG)]) == 2
    assert "--seg and --mat are required" in capsys.readouterr().err


# ----------------------------------------------------------------------------- predict


def _predict(world, name, inp, out, *extra):
    ckpt = world["models"] / "seed0" / "methods" / name / f"seg{SEG}-mat{MAT}" / "model.pt"
    return main(["predict", "--checkpoint", str(ckpt), "--input", str(inp), "--output", str(out),
                 "--short-side", str(SIZE), "--device", "cpu", *extra])


@pytest.fixture(scope="module")
def photos(world):
    """Two photos (one in a sub-folder) with trimaps and masks beside them under other roots."""
    root = world["root"] / "photos"
    rng = np.random.default_rng(3)
    out = {}
    for rel in ("a.png", "sub/b.jpg"):
        alpha = _disc(rng, SIZE)
        image = np.round(alpha[..., None] * 220 + (1 - alpha[..., None]) * rng.integers(0, 60, (SIZE, SIZE, 3)))
        image = image.astype(np.uint8)
        save(root / "in" / rel, image, "PNG")
        stem = Path(rel).with_suffix(".png")
        save(root / "trimaps" / stem, eval_trimap(alpha, 9))
        save(root / "masks" / stem, ((alpha >= 0.5) * 255).astype(np.uint8))
        out[rel] = {"image": np.asarray(Image.open(root / "in" / rel).convert("RGB")), "alpha": alpha}
    return root, out


def test_predict_with_each_methods_guidance(world, trained, photos, tmp_path):
    root, items = photos
    assert _predict(world, "dim", root / "in", tmp_path / "dim", "--trimap", str(root / "trimaps")) == 0
    assert _predict(world, "mgm", root / "in", tmp_path / "mgm", "--mask", str(root / "masks")) == 0
    assert _predict(world, "mam", root / "in", tmp_path / "box", "--box", "8,8,40,40") == 0
    assert _predict(world, "mam", root / "in" / "a.png", tmp_path / "point", "--point", "24,24") == 0
    for folder, names in (("dim", ["a.png", "sub/b.png"]), ("mgm", ["a.png", "sub/b.png"]),
                          ("box", ["a.png", "sub/b.png"]), ("point", ["a.png"])):
        for n in names:
            alpha = np.asarray(Image.open(tmp_path / folder / n))
            assert alpha.dtype == np.uint8 and alpha.shape == (SIZE, SIZE), (folder, n)
    # the written alpha is the core prediction with that guidance
    model, _ = load_model(world["models"] / "seed0" / "methods" / "dim" / f"seg{SEG}-mat{MAT}" / "model.pt")
    trimap = np.asarray(Image.open(root / "trimaps" / "sub" / "b.png"))
    expected = predict_image(model, items["sub/b.jpg"]["image"], trimap, short_side=SIZE)
    written = np.asarray(Image.open(tmp_path / "dim" / "sub" / "b.png")).astype(int)
    assert np.abs(written - np.round(expected * 255)).max() <= 1


def test_predict_says_which_input_a_checkpoint_needs(world, trained, photos, tmp_path, capsys):
    root, _ = photos
    cases = [("dim", "--trimap DIR"), ("adamatting", "--trimap DIR"), ("mgm", "--mask DIR"),
             ("mgm_wild", "--mask DIR"), ("mam", "--box X0,Y0,X1,Y1 or --point X,Y")]
    for name, flag in cases:
        assert _predict(world, name, root / "in", tmp_path / name) == 2
        err = capsys.readouterr().err
        assert f"is a {name} model" in err and f"Pass {flag}" in err, err
        assert not (tmp_path / name).exists()
    assert _predict(world, "mgm", root / "in", tmp_path / "x", "--trimap", str(root / "trimaps")) == 2
    assert "--trimap is not used by a mgm model" in capsys.readouterr().err
    assert _predict(world, "mam", root / "in", tmp_path / "x", "--box", "1,2,3") == 2
    assert "expected X0,Y0,X1,Y1" in capsys.readouterr().err
    assert _predict(world, "mam", root / "in", tmp_path / "x", "--box", "1,2,3,4", "--point", "1,1") == 2
    assert "either --box or --point" in capsys.readouterr().err
    # an image without its trimap is skipped with the reason; the others are written
    (root / "partial").mkdir()
    (root / "partial" / "a.png").write_bytes((root / "trimaps" / "a.png").read_bytes())
    assert _predict(world, "dim", root / "in", tmp_path / "partial", "--trimap", str(root / "partial")) == 0
    err = capsys.readouterr().err
    assert "b.jpg: no trimap for it in" in err and (tmp_path / "partial" / "a.png").is_file()
    # the main method takes no guidance
    mlb = world["models"] / "seed0" / "pretrain" / f"seg{SEG}" / "model.pt"
    rc = main(["predict", "--checkpoint", str(mlb), "--input", str(root / "in"), "--output", str(tmp_path / "m"),
               "--mask", str(root / "masks"), "--device", "cpu"])
    assert rc == 2 and "takes the RGB image only; drop --mask" in capsys.readouterr().err


# ----------------------------------------------------------------------------- report


def test_report_shows_the_method_rows_beside_the_main_method(world, evaluated, tmp_path):
    import shutil

    metrics = tmp_path / "metrics"
    shutil.copytree(world["root"] / "metrics" / "seed0" / "methods", metrics / "seed0" / "methods")
    whole = {"sad": 0.5, "mse": 0.004, "grad": 0.1, "conn": 0.4}
    boundary = {"sad": 0.2, "mse": 0.03, "grad": 0.1, "conn": 0.2}
    for s, m in parse_params(make_params()).study.cells():
        kind = core.cell_kind(s, m)
        role = {"seg_only": "pretrain", "mat_only": "teacher", "both": "student"}[kind]
        record = {"cell": core.cell_name(s, m), "seg_count": s, "mat_count": m, "kind": kind, "primary": role,
                  "models": {role: {"network": NETWORK, "params": 1, "fps": 99.0,
                                    "sets": {"natural": {"n": 3, "whole": whole, "boundary": boundary}}}}}
        (metrics / "seed0" / f"{core.cell_name(s, m)}.json").write_text(json.dumps(record))
    (metrics / "seed0" / "methods" / "modnet.json").write_text("{}")
    result = report_stage.build_report(parse_params(make_params()), metrics, tmp_path / "reports", heatmap_metrics=())
    assert any("ignored method metrics not in methods.compare in" in w and w.endswith(": modnet.json")
               for w in result.warnings)
    html = (tmp_path / "reports" / "index.html").read_text()
    assert "Method comparison" in html and 'href="#methods"' in html
    md = (tmp_path / "reports" / "methods.md").read_text()
    lines = [ln for ln in md.splitlines() if ln.startswith(f"| seg{SEG}-mat{MAT} |")]
    assert [ln.split(" | ")[1] for ln in lines] == ["MLB (student)", *COMPARED]
    rows = {r["method"]: r for r in core.method_rows(
        {(SEG, MAT): json.loads((metrics / "seed0" / f"seg{SEG}-mat{MAT}.json").read_text())}, "natural",
        {(SEG, MAT): evaluated})}
    for name in COMPARED:
        natural = evaluated[name]["sets"]["natural"]
        assert rows[name]["whole_mse"] == natural["whole"]["mse"] and rows[name]["fps"] == evaluated[name]["fps"]
        assert rows[name]["boundary_sad"] == natural["boundary"]["sad"]
        assert core.format_value(natural["boundary"]["mse"] * 1e3) in html
    assert rows["MLB (student)"]["fps"] == 99.0 and rows["dim"]["input"] == "trimap"
    csv_text = (tmp_path / "reports" / "methods.csv").read_text().splitlines()
    assert csv_text[0] == ",".join(core.METHOD_COLUMNS) and len(csv_text) == 1 + 1 + len(COMPARED)
    # a compared method whose file is missing is a row saying so
    (metrics / "seed0" / "methods" / "mam.json").unlink()
    result = report_stage.build_report(parse_params(make_params()), metrics, tmp_path / "r2", heatmap_metrics=())
    assert any(w.startswith("missing method mam") for w in result.warnings)
    assert "| mam (missing) |" in (tmp_path / "r2" / "methods.md").read_text()

"""pretrain → teacher → MLB student on tiny real shards, CPU, a real sqlite MLflow store.

The shard sets are written with the real writer (matting_pipeline.shards.write_shard_set) in the
layout FORMATS.md fixes: data/shards/{seg,matte}, data/composite/train (meta fg_keys).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient

from matting_core.checkpoint import load_model, read_checkpoint
from matting_core.training import mlb_labels
from matting_pipeline import tracking
from stages import pretrain, student, teacher
from matting_pipeline.cli import main
from matting_pipeline.config import parse_params
from matting_pipeline.shards import subset_keys, write_shard_set
from matting_pipeline.cli import StageError
from matting_pipeline.shards import ShardReader
from matting_pipeline.trainer import apply_train_settings, train
from matting_pipeline.views import PositionSampler

CPU = torch.device("cpu")
SIZE = 48
N_SEG, N_MAT = 12, 6
SEG, MAT = 8, 3
ITERS = 16


# ----------------------------------------------------------------------------- data


def _disc(rng, size):
    yy, xx = np.mgrid[:size, :size].astype(np.float32)
    cy, cx = rng.uniform(size * 0.35, size * 0.65, 2)
    radius = rng.uniform(size * 0.2, size * 0.3)
    return np.clip((radius - np.hypot(yy - cy, xx - cx)) / 3 + 0.5, 0, 1).astype(np.float32)


def make_data(root: Path, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    seg = []
    for i in range(N_SEG):
        alpha = _disc(rng, SIZE)
        fg, bg = rng.integers(150, 255, 3), rng.integers(0, 100, (SIZE, SIZE, 3))
        image = np.round(alpha[..., None] * fg + (1 - alpha[..., None]) * bg).astype(np.uint8)
        seg.append((f"seg-{i:06d}", {"set": "seg"}, {"image": image, "mask": alpha > 0.5}))
    write_shard_set(root / "shards" / "seg", "seg", seg, samples_per_shard=5, order=[k for k, _, _ in seg[::-1]])
    mattes, composites = [], []
    for i in range(N_MAT):
        key = f"matte-{i:06d}"
        alpha = _disc(rng, SIZE)
        fg = np.full((SIZE, SIZE, 3), rng.integers(150, 255, 3), np.uint8)
        mattes.append((key, {"set": "matte"}, {"fg": fg, "alpha": alpha}))
        for j in range(2):
            bg = rng.integers(0, 100, (SIZE, SIZE, 3)).astype(np.uint8)
            image = np.round(alpha[..., None] * fg + (1 - alpha[..., None]) * bg).astype(np.uint8)
            meta = {"fg_keys": [key], "bg_key": f"background-{j:06d}", "two_instance": False, "target": "single"}
            composites.append((f"train-{i:06d}-{j}", meta, {"image": image, "alpha": alpha, "fg": fg, "bg": bg}))
    # a two-instance composite whose partner lies outside the budget must not be used
    composites.append(
        ("train-two-000000", {"fg_keys": ["matte-000000", "matte-000005"], "two_instance": True}, composites[0][2])
    )
    write_shard_set(root / "shards" / "matte", "matte", mattes, samples_per_shard=4)
    write_shard_set(root / "composite" / "train", "train", composites, samples_per_shard=5)


def make_params(**train_overrides) -> dict:
    step = {"iters": ITERS, "lr": 3.0e-3, "batch_size": 4, "crop": 32, "checkpoint_every": 4, "log_every": 1}
    raw = {
        "model": {"network": "unet_r18x0.25"},
        "train": {
            "device": "cpu",
            "num_workers": 0,
            "pretrain": dict(step),
            "teacher": dict(step),
            "student": dict(step),
        },
        "study": {"experiment": "test-training", "seg": [SEG], "mat": [MAT]},
    }
    for section, values in train_overrides.items():
        raw["train"][section].update(values)
    return raw


def args_for(world, seg, mat, models_root=None, data_root=None, iters=None, seed=0):
    return argparse.Namespace(
        seg=seg,
        mat=mat,
        params=str(world["params_file"]),
        data_root=str(data_root or world["data"]),
        models_root=str(models_root or world["models"]),
        device="cpu",
        iters=iters,
        seed=seed,
    )


def clone_models(world, dst: Path) -> Path:
    """A models root holding copies of the pre-trained and teacher checkpoints."""
    for stage in ("pretrain", "teacher"):
        for path in (world["models"] / "seed0" / stage).glob("*/model.pt"):
            (dst / "seed0" / stage / path.parent.name).mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, dst / "seed0" / stage / path.parent.name / "model.pt")
    return dst


def run_job(module, world, seg, mat, raw=None, record=None, fail_at=None, **kw):
    """Build and train a stage job in-process; ``record`` collects (step, batch, terms)."""
    params = parse_params(raw or make_params())
    job = apply_train_settings(module.build_job(args_for(world, seg, mat, **kw), params, CPU), params)  # as the stage does

    def on_step(step, batch, terms):
        if record is not None:
            record.append((step, {k: v.detach().clone() for k, v in batch.items()}, {k: float(v) for k, v in terms.items()}))
        if fail_at is not None and step == fail_at:
            raise RuntimeError(f"injected failure at step {step}")

    return job, train(job, CPU, on_step=on_step, progress=False)


def losses_of(record):
    return [terms["total"] for _, _, terms in record]


def assert_loss_falls(losses):
    first, last = np.mean(losses[:4]), np.mean(losses[-4:])
    assert last < 0.95 * first, f"loss did not fall: first {first:.4f}, last {last:.4f}: {losses}"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("training")
    make_data(root / "data")
    (root / "params.yaml").write_text(yaml.safe_dump(make_params()))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
        mp.chdir(root)  # MLflow's default artifact root is relative to the working directory
        yield {"root": root, "data": root / "data", "models": root / "models", "params_file": root / "params.yaml", "runs": {}}
    torch.set_num_threads(threads)
    mlflow.set_tracking_uri(None)


@pytest.fixture(scope="module")
def pretrained(world):
    record = []
    job, result = run_job(pretrain, world, SEG, 0, record=record)
    return {"job": job, "result": result, "record": record}


@pytest.fixture(scope="module")
def taught(world, pretrained):
    record = []
    job, result = run_job(teacher, world, SEG, MAT, record=record)
    return {"job": job, "result": result, "record": record}


# ----------------------------------------------------------------------------- pretrain


def test_pretrain_trains_and_loss_falls(world, pretrained):
    result, record = pretrained["result"], pretrained["record"]
    assert [s for s, _, _ in record] == list(range(1, ITERS + 1))
    assert_loss_falls(losses_of(record))
    path = world["models"] / "seed0" / "pretrain" / f"seg{SEG}" / "model.pt"
    assert result["model_path"] == path and path.is_file()
    assert not (path.parent / "state.pt").exists(), "the resumable state is removed once model.pt exists"
    # exactly the nested subset of the seg set, as 0/1 mattes
    assert pretrained["job"].dataset.reader.keys == subset_keys(world["data"] / "shards" / "seg", SEG)
    masks = record[0][1]["mask"]
    assert set(torch.unique(masks).tolist()) <= {0.0, 1.0}


def test_checkpoint_loads_with_weights_only(world, pretrained):
    path = pretrained["result"]["model_path"]
    payload = torch.load(path, map_location="cpu", weights_only=True)
    assert payload["network_spec"]["name"] == "unet_r18x0.25"
    model, info = load_model(path)
    assert info["extra"]["stage"] == "pretrain" and info["extra"]["step"] == ITERS
    assert info["extra"]["seg_count"] == SEG and info["extra"]["run_id"] == pretrained["result"]["run_id"]
    # the saved weights are the trained ones, not the initial ones
    trained = pretrained["job"].model.state_dict()
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, trained[key].cpu())


def test_mlflow_run_is_nested_with_params_metrics_and_artifact(world, pretrained, taught):
    client = MlflowClient()
    for stage, got, seg, mat, name in (
        ("pretrain", pretrained, SEG, 0, f"pretrain-unet_r18x0.25-seg{SEG}-seed0"),
        ("teacher", taught, SEG, MAT, f"teacher-unet_r18x0.25-seg{SEG}-mat{MAT}-seed0"),
    ):
        run_id = got["result"]["run_id"]
        run = client.get_run(run_id)
        cell = tracking.get_or_create_cell_run("test-training", seg, mat, "unet_r18x0.25")
        assert run.data.tags["mlflow.parentRunId"] == cell
        assert run.data.tags["mlflow.runName"] == name
        assert run.info.status == "FINISHED"
        p = run.data.params
        assert p["stage"] == stage and p["seg_count"] == str(seg) and p["mat_count"] == str(mat)
        assert p["network"] == "unet_r18x0.25" and float(p["lr"]) == 3e-3 and p["iters"] == str(ITERS)
        assert p["batch_size"] == "4" and p["crop"] == "32" and p["scale_range"] == "0.75,1.25"
        history = client.get_metric_history(run_id, "loss/total")
        assert sorted(m.step for m in history) == list(range(1, ITERS + 1))
        np.testing.assert_allclose(
            [m.value for m in sorted(history, key=lambda m: m.step)], losses_of(got["record"]), rtol=1e-6
        )
        assert len(client.get_metric_history(run_id, "lr")) == ITERS
        artifacts = [a.path for a in client.list_artifacts(run_id, "checkpoint")]
        assert artifacts == ["checkpoint/model.pt"]
        run_json = (got["result"]["model_path"].parent / "run.json").read_text()
        assert run_id in run_json and '"FINISHED"' in run_json
    teacher_terms = client.get_run(taught["result"]["run_id"]).data.metrics
    assert {"loss/l1", "loss/composition", "loss/laplacian", "loss/boundary_bce", "loss/matte"} <= set(teacher_terms)


# ----------------------------------------------------------------------------- teacher


def test_teacher_from_pretrain_trains_on_the_matte_budget(world, pretrained, taught):
    assert_loss_falls(losses_of(taught["record"]))
    job = taught["job"]
    budget = set(subset_keys(world["data"] / "shards" / "matte", MAT))
    used = [job.dataset.reader.meta(k)["fg_keys"] for k in job.dataset.reader.keys]
    assert len(used) == 2 * MAT and all(set(fg) <= budget for fg in used)
    assert job.run_params["init_from"].endswith(f"pretrain/seg{SEG}/model.pt")
    batch = taught["record"][0][1]
    assert {"image", "alpha", "fg", "bg"} <= set(batch)
    _, info = load_model(taught["result"]["model_path"])
    assert info["extra"]["stage"] == "teacher" and info["extra"]["mat_count"] == MAT


def test_teacher_resume_continues_at_saved_step_with_the_same_losses(world):
    raw = make_params(teacher={"iters": 6, "checkpoint_every": 2})
    root_a, root_b = world["root"] / "resume-a", world["root"] / "resume-b"
    straight = []
    run_job(teacher, world, 0, MAT, raw=raw, record=straight, models_root=root_a)

    first = []
    with pytest.raises(RuntimeError, match="injected failure at step 3"):
        run_job(teacher, world, 0, MAT, raw=raw, record=first, fail_at=3, models_root=root_b)
    cell = root_b / "seed0" / "teacher" / f"seg0-mat{MAT}"
    assert (cell / "state.pt").is_file() and not (cell / "model.pt").exists()
    assert read_checkpoint(cell / "state.pt")["step"] == 2
    failed_run = read_checkpoint(cell / "state.pt")["extra"]["run_id"]
    assert MlflowClient().get_run(failed_run).info.status == "FAILED"

    second = []
    _, result = run_job(teacher, world, 0, MAT, raw=raw, record=second, models_root=root_b)
    assert result["start_step"] == 2 and result["step"] == 6 and result["resumed"]
    assert [s for s, _, _ in second] == [3, 4, 5, 6]
    np.testing.assert_allclose(losses_of(second), losses_of(straight)[2:], rtol=1e-5)
    assert (cell / "model.pt").is_file() and not (cell / "state.pt").exists()
    # the same MLflow run continues; every step is logged exactly once
    assert result["run_id"] == failed_run
    history = MlflowClient().get_metric_history(failed_run, "loss/total")
    assert sorted(m.step for m in history) == [1, 2, 3, 4, 5, 6]
    assert MlflowClient().get_run(failed_run).info.status == "FINISHED"


def pretrain_command(world, name: str, data=None, **pretrain) -> tuple[list[str], Path]:
    """``params-<name>.yaml`` with ``train.pretrain`` overrides, the stage's arguments for a
    models root ``<name>-models`` and the instance's output folder."""
    params_file = world["root"] / f"params-{name}.yaml"
    params_file.write_text(yaml.safe_dump(make_params(pretrain=pretrain)))
    models = world["root"] / f"{name}-models"
    cmd = ["--seg", str(SEG), "--params", str(params_file), "--data-root", str(data or world["data"]),
           "--models-root", str(models), "--device", "cpu"]
    return cmd, models / "seed0" / "pretrain" / f"seg{SEG}"


def sigkill_pretrain_when(cmd: list[str], marker: Path) -> None:
    """Run ``python -m stages.pretrain CMD`` as its own process and SIGKILL it as soon as
    ``marker`` (its state.pt or run.json) exists."""
    proc = subprocess.Popen([sys.executable, "-m", "stages.pretrain", *cmd], env={**os.environ, "OMP_NUM_THREADS": "1"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert marker.exists(), f"the stage never wrote {marker.name}"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()


def test_sigkilled_process_resumes_from_its_last_state(world, pretrained, capsys):
    """A real kill: SIGKILL the stage process once a state exists, re-run, it continues."""
    cmd, out_dir = pretrain_command(world, "killed", iters=30, checkpoint_every=2)
    state = out_dir / "state.pt"
    sigkill_pretrain_when(cmd, state)
    saved = read_checkpoint(state)["step"]
    assert 2 <= saved < 30 and not (state.parent / "model.pt").exists()
    assert main(["pretrain", *cmd]) == 0
    assert f"resuming {state} at step {saved}/30" in capsys.readouterr().out
    _, info = load_model(state.parent / "model.pt")
    assert info["extra"]["step"] == 30 and not state.exists()


def test_a_killed_run_does_not_resume_on_other_data_with_the_same_keys(world, capsys):
    """Issue 16 item 1: SIGKILL pre-training on data A, rebuild the set with other pixels
    under the same keys (a new synthetic seed), re-run: it must start afresh and end with
    the weights of a clean run on the new data, not resume steps taken on A."""
    data = world["root"] / "data-other"
    make_data(data, seed=0)
    cmd, out_dir = pretrain_command(world, "other-data", data=data, iters=24, checkpoint_every=2)
    clean_cmd, clean_dir = pretrain_command(world, "other-data-clean", data=data, iters=24, checkpoint_every=2)
    sigkill_pretrain_when(cmd, out_dir / "state.pt")
    seg_index = json.loads((data / "shards" / "seg" / "index.json").read_text())
    shutil.rmtree(data)
    make_data(data, seed=1)  # same keys, same order, other pixels
    assert json.loads((data / "shards" / "seg" / "index.json").read_text())["order"] == seg_index["order"]
    capsys.readouterr()
    assert main(["pretrain", *cmd]) == 0
    out = capsys.readouterr().out
    assert "resuming" not in out and "belongs to another configuration" in out
    assert main(["pretrain", *clean_cmd]) == 0
    resumed, _ = load_model(out_dir / "model.pt")
    fresh, _ = load_model(clean_dir / "model.pt")
    for (name, a), b in zip(resumed.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), f"{name} differs from a clean run on the new data"


def test_a_run_killed_before_its_first_state_is_closed_not_left_running(world):
    """chaos: a training process SIGKILLed before it saved a resumable state left its MLflow
    run RUNNING for ever beside the run that replaced it."""
    cmd, out_dir = pretrain_command(world, "abandoned", iters=400, checkpoint_every=1000)
    run_json = out_dir / "run.json"
    sigkill_pretrain_when(cmd, run_json)
    killed = json.loads(run_json.read_text())
    assert killed["status"] == "RUNNING" and not (run_json.parent / "state.pt").exists()
    assert main(["pretrain", *cmd, "--iters", "3"]) == 0
    client = MlflowClient()
    old = client.get_run(killed["run_id"])
    new_id = json.loads(run_json.read_text())["run_id"]
    assert old.info.status == "KILLED" and old.data.tags["replaced_by"] == new_id
    assert client.get_run(new_id).info.status == "FINISHED"


def test_a_finished_run_killed_before_dvc_recorded_it_is_not_trained_again(world, capsys):
    """chaos: a teacher killed after writing model.pt but before dvc committed the stage was
    trained again on the rerun: same weights, a second FINISHED MLflow run."""
    raw = make_params(teacher={"iters": 3, "checkpoint_every": 2})
    root = world["root"] / "finished-twice"
    client = MlflowClient()
    _, first = run_job(teacher, world, 0, MAT, raw=raw, models_root=root)
    run = client.get_run(first["run_id"])

    def runs_named():
        return len(client.search_runs([run.info.experiment_id], f"attributes.run_name = '{run.info.run_name}'"))

    before = runs_named()
    # killed between model.pt and the MLflow/run.json bookkeeping: run RUNNING, run.json RUNNING
    client.update_run(first["run_id"], status="RUNNING")
    run_json = first["model_path"].parent / "run.json"
    run_json.write_text(json.dumps({**json.loads(run_json.read_text()), "status": "RUNNING"}))
    weights = load_model(first["model_path"])[0].state_dict()
    first["model_path"].unlink()  # and DVC deletes a stage's outs before it runs it again
    capsys.readouterr()
    _, again = run_job(teacher, world, 0, MAT, raw=raw, models_root=root)
    assert "not training it again" in capsys.readouterr().out
    assert again["reused"] and again["run_id"] == first["run_id"] and again["step"] == 3
    assert runs_named() == before and client.get_run(first["run_id"]).info.status == "FINISHED"
    assert json.loads(run_json.read_text())["status"] == "FINISHED"
    for (name, a), b in zip(load_model(first["model_path"])[0].state_dict().items(), weights.values()):
        assert torch.equal(a, b), name
    raw["train"]["teacher"]["lr"] = 1e-3  # another configuration trains
    _, other = run_job(teacher, world, 0, MAT, raw=raw, models_root=root)
    assert not other.get("reused") and other["run_id"] != first["run_id"]


def test_a_state_from_another_configuration_is_not_resumed(world):
    raw = make_params(teacher={"iters": 4, "checkpoint_every": 2})
    root = world["root"] / "resume-other"
    with pytest.raises(RuntimeError):
        run_job(teacher, world, 0, MAT, raw=raw, fail_at=3, models_root=root)
    raw["train"]["teacher"]["lr"] = 1e-3
    _, result = run_job(teacher, world, 0, MAT, raw=raw, models_root=root)
    assert result["start_step"] == 0 and result["step"] == 4


# ----------------------------------------------------------------------------- student


def test_student_in_process_labels_obey_the_blend_identity(world, taught):
    record = []
    job, result = run_job(student, world, SEG, MAT, record=record)
    assert_loss_falls(losses_of(record))
    assert job.run_params["label_source"] == "in-process"
    assert job.input_key == "image_strong"
    frozen, _ = load_model(taught["result"]["model_path"])
    for _, batch, _ in (record[0], record[-1]):
        with torch.no_grad():
            out = frozen(batch["image"])  # the weak view
        beta = torch.sigmoid(out["boundary_logits"])
        expected = beta * out["alpha"] + (1 - beta) * batch["mask"]
        torch.testing.assert_close(batch["blended"], expected, atol=1e-5, rtol=0)
        assert (batch["blended"] - batch["mask"]).abs().max() > 1e-3  # not just S
        assert (batch["blended"] - out["alpha"]).abs().max() > 1e-3  # not just α'_t
        assert (batch["image_strong"] - batch["image"]).abs().mean() > 1e-3
    # init from the pre-trained model (same architecture)
    assert job.run_params["init_from"].endswith(f"pretrain/seg{SEG}/model.pt")
    _, info = load_model(result["model_path"])
    assert info["extra"]["stage"] == "student" and info["extra"]["label_source"] == "in-process"


def test_student_reads_offline_pseudolabel_shards(world, taught, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(world["data"], data)
    clone_models(world, tmp_path / "models")
    frozen, _ = load_model(taught["result"]["model_path"])
    keys = subset_keys(data / "shards" / "seg", SEG)
    samples = []
    reader = ShardReader(data / "shards" / "seg", keys)
    for key in keys:
        s = reader.read(key)
        image = torch.from_numpy(s["image"]).permute(2, 0, 1)[None].float() / 255
        labels = mlb_labels(frozen, image, torch.from_numpy(s["mask"])[None, None])
        arrays = {k: v[0, 0].numpy() for k, v in labels.items()}
        samples.append((key, {"set": "pseudolabel"}, {"image": s["image"], "mask": s["mask"], **arrays}))
    cell = f"seg{SEG}-mat{MAT}"
    write_shard_set(data / "pseudolabels" / "seed0" / cell, "pseudolabel", samples, samples_per_shard=4)

    record = []
    job, _ = run_job(
        student, world, SEG, MAT, raw=make_params(student={"iters": 3}), record=record,
        data_root=data, models_root=tmp_path / "models",
    )
    assert job.run_params["label_source"] == "pseudolabel-shards"
    batch = record[0][1]
    assert "teacher_alpha" not in batch and batch["blended"].shape == batch["mask"].shape
    assert 0 < float(batch["blended"].mean()) < 1

    # labels for another subset are refused with the command that fixes it
    write_shard_set(data / "pseudolabels" / "seed0" / cell, "pseudolabel", samples[:-1], samples_per_shard=4)
    with pytest.raises(StageError, match="re-run `matting pseudolabel"):
        student.build_job(args_for(world, SEG, MAT, data_root=data), parse_params(make_params()), CPU)


def test_student_ema_mode_updates_and_resumes_its_teacher(world, taught):
    m = 0.8
    raw = make_params(student={"iters": 4, "checkpoint_every": 2, "label_mode": "ema", "ema_momentum": m})
    root_a = clone_models(world, world["root"] / "ema-a")
    root_b = clone_models(world, world["root"] / "ema-b")
    params = parse_params(raw)
    job = apply_train_settings(student.build_job(args_for(world, SEG, MAT, models_root=root_a), params, CPU), params)
    ema_teacher = job.modules["ema_teacher"]
    snapshots = [{k: v.clone() for k, v in ema_teacher.state_dict().items()}]
    students = []

    def on_step(step, batch, terms):
        snapshots.append({k: v.clone() for k, v in ema_teacher.state_dict().items()})
        students.append({k: v.clone() for k, v in job.model.state_dict().items()})

    train(job, CPU, on_step=on_step, progress=False)
    assert job.run_params["label_source"] == "ema"
    for k in range(1, 5):
        for key in ("encoder.stem.0.weight", "encoder.stem.1.running_mean", "alpha_head.weight"):
            torch.testing.assert_close(snapshots[k][key], m * snapshots[k - 1][key] + (1 - m) * students[k - 1][key])

    with pytest.raises(RuntimeError):
        run_job(student, world, SEG, MAT, raw=raw, fail_at=3, models_root=root_b)
    _, result = run_job(student, world, SEG, MAT, raw=raw, models_root=root_b)
    assert result["start_step"] == 2
    a, _ = load_model(root_a / "seed0" / "student" / f"seg{SEG}-mat{MAT}" / "model.pt")
    b, _ = load_model(result["model_path"])
    for key, value in a.state_dict().items():  # equal only if the EMA teacher was restored too
        torch.testing.assert_close(b.state_dict()[key], value, rtol=1e-5, atol=1e-6)


def test_student_ema_needs_the_same_architecture(world, taught):
    raw = make_params(student={"label_mode": "ema", "network": "unet_r18x0.5"})
    with pytest.raises(StageError, match="share an architecture"):
        student.build_job(args_for(world, SEG, MAT), parse_params(raw), CPU)


# ----------------------------------------------------------------------------- CLI + errors


def test_cli_errors_name_the_missing_piece(world, capsys):
    common = ["--params", str(world["params_file"]), "--data-root", str(world["data"]), "--device", "cpu"]
    empty = ["--models-root", str(world["root"] / "empty-models")]
    assert main(["pretrain", "--seg", "0", *common, *empty]) == 2
    assert "nothing to pre-train" in capsys.readouterr().err
    assert main(["teacher", "--seg", str(SEG), "--mat", "0", *common, *empty]) == 2
    assert "needs matte labels" in capsys.readouterr().err
    assert main(["teacher", "--seg", str(SEG), "--mat", str(MAT), *common, *empty]) == 2
    err = capsys.readouterr().err
    assert f"pretrain/seg{SEG}/model.pt not found" in err and f"matting pretrain --seg {SEG}" in err
    assert main(["student", "--seg", "0", "--mat", str(MAT), *common, *empty]) == 2
    assert "needs both budgets" in capsys.readouterr().err
    assert main(["pretrain", "--seg", "999", *common, *empty]) == 2
    assert "has only 12" in capsys.readouterr().err


def test_cli_runs_a_stage_with_iters_override(world, pretrained, capsys):
    models = clone_models(world, world["root"] / "cli-models")
    rc = main(["teacher", "--seg", str(SEG), "--mat", str(MAT), "--params", str(world["params_file"]),
               "--data-root", str(world["data"]), "--models-root", str(models), "--device", "cpu", "--iters", "2"])
    assert rc == 0
    _, info = load_model(models / "seed0" / "teacher" / f"seg{SEG}-mat{MAT}" / "model.pt")
    assert info["extra"]["step"] == 2


def test_position_sampler_resumes_the_same_sequence():
    full = PositionSampler(5, seed=3)
    it = iter(full)
    sequence = [next(it) for _ in range(17)]
    assert sorted(i for i, _ in sequence[:5]) == list(range(5))  # each epoch is a permutation
    resumed = iter(PositionSampler(5, seed=3, start=8))
    assert [next(resumed) for _ in range(9)] == sequence[8:]


def test_loader_workers_give_the_same_batches(world):
    from matting_pipeline.views import ViewDataset, make_loader

    reader = ShardReader(world["data"] / "shards" / "seg", subset_keys(world["data"] / "shards" / "seg", SEG))
    dataset = ViewDataset(reader, ["mask"], 32, (0.75, 1.25), seed=0, strong=True)
    in_process = iter(make_loader(dataset, 4, start_step=1, num_workers=0))
    workers = iter(make_loader(dataset, 4, start_step=1, num_workers=2))
    for _ in range(3):
        a, b = next(in_process), next(workers)
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)
    del workers


def test_the_decoded_cache_and_the_prefetch_thread_change_no_batch(world):
    from matting_pipeline.views import Prefetcher, ViewDataset, make_loader

    seg_dir = world["data"] / "shards" / "seg"
    reader = ShardReader(seg_dir, subset_keys(seg_dir, SEG))
    plain = ViewDataset(reader, ["mask"], 32, (0.75, 1.25), seed=0, strong=True)
    cached = ViewDataset(reader, ["mask"], 32, (0.75, 1.25), seed=0, strong=True)
    one = sum(v.nbytes for k, v in reader.read(reader.keys[0], roles=["image", "mask"]).items() if k != "meta"
              and hasattr(v, "nbytes"))
    cached.enable_cache(3 * one)  # room for 3 of the 8 samples: hits, misses and evictions
    with Prefetcher(iter(make_loader(cached, 4, start_step=1, num_workers=0))) as ahead:
        straight = iter(make_loader(plain, 4, start_step=1, num_workers=0))
        for _ in range(6):  # three epochs
            a, b = next(straight), next(ahead)
            for key in a:
                torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)
    assert 0 < len(cached._cache) <= 3 and cached._cached_bytes <= 3 * one
    sample = next(iter(cached._cache.values()))
    with pytest.raises(ValueError, match="read-only"):
        sample["image"][0, 0, 0] = 1  # an augmentation writing into its input fails, not corrupts
    assert plain._cache == {} and plain.cache_bytes == 0


def test_the_prefetcher_raises_the_loaders_error_in_order_and_stops_its_thread():
    from matting_pipeline.shards import ShardError
    from matting_pipeline.views import Prefetcher

    def failing():
        yield 1
        yield 2
        raise ShardError("data/shards/seg/seg-000001.tar: truncated")

    ahead = Prefetcher(failing())
    assert next(ahead) == 1 and next(ahead) == 2
    with pytest.raises(ShardError, match="truncated"):
        next(ahead)
    with pytest.raises(StopIteration):
        next(ahead)
    ahead.close()
    assert not ahead._thread.is_alive()

    def endless():
        n = 0
        while True:
            n += 1
            yield n

    with Prefetcher(endless(), depth=2) as ahead:
        assert [next(ahead) for _ in range(5)] == [1, 2, 3, 4, 5]
    assert not ahead._thread.is_alive()  # closed while blocked on a full queue


def test_channels_last_is_part_of_the_configuration_and_trains_the_same_network(world):
    raw_last = make_params(teacher={"iters": 3, "checkpoint_every": 2})
    raw_first = make_params(teacher={"iters": 3, "checkpoint_every": 2})
    raw_first["train"]["channels_last"] = False
    rec_last, rec_first = [], []
    job_last, result_last = run_job(teacher, world, 0, MAT, raw=raw_last, record=rec_last,
                                    models_root=world["root"] / "nhwc")
    job_first, result_first = run_job(teacher, world, 0, MAT, raw=raw_first, record=rec_first,
                                      models_root=world["root"] / "nchw")
    assert job_last.channels_last and not job_first.channels_last
    assert job_last.fingerprint() != job_first.fingerprint()  # a state of one is never resumed by the other
    conv = next(p for p in job_last.model.parameters() if p.dim() == 4 and p.shape[2] > 1)
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    assert rec_last[0][1]["image"].is_contiguous(memory_format=torch.channels_last)
    # the same arithmetic in another summation order: the first step's loss agrees to rounding,
    # and (Adam moves every weight by about lr a step, whatever its gradient's size) the weights
    # stay within a few lr of each other; model.pt loads into a plain channels-first network
    np.testing.assert_allclose(rec_last[0][2]["total"], rec_first[0][2]["total"], rtol=1e-5)
    last, _ = load_model(result_last["model_path"])
    first, _ = load_model(result_first["model_path"])
    weights = dict(first.named_parameters())
    worst = max(float((p - weights[name]).detach().abs().max()) for name, p in last.named_parameters())
    assert worst <= 2 * 3 * 3.0e-3, worst  # lr 3e-3, 3 steps


# ----------------------------------------------------------------------------- control, seeds, knobs


def test_control_student_is_the_student_recipe_on_the_label_s(world, pretrained):
    from stages import control

    record = []
    job, result = run_job(control, world, SEG, 0, record=record)
    assert result["model_path"] == world["models"] / "seed0" / "control" / f"seg{SEG}" / "model.pt"
    assert job.input_key == "image_strong" and job.cell == f"seg{SEG}-mat0"
    assert job.run_params["init_from"].endswith(f"seed0/pretrain/seg{SEG}/model.pt")
    assert job.dataset.reader.keys == subset_keys(world["data"] / "shards" / "seg", SEG)
    # same steps, crops and augmentation as the student: train.student's hyper-parameters
    params = parse_params(make_params())
    assert job.hyper["iters"] == params.train.student.iters and job.hyper["crop"] == params.train.student.crop
    batch = record[0][1]
    assert set(torch.unique(batch["mask"]).tolist()) <= {0.0, 1.0}  # the label is S
    assert not torch.equal(batch["image"], batch["image_strong"])
    run = MlflowClient().get_run(result["run_id"])
    assert run.data.tags["mlflow.runName"] == f"control-unet_r18x0.25-seg{SEG}-seed0"
    with pytest.raises(StageError, match="needs S > 0"):
        control.build_job(args_for(world, 0, 0), params, CPU)


def test_a_study_seed_moves_the_outputs_and_the_step_seed(world, pretrained):
    record_0, record_1 = [], []
    raw = make_params(pretrain={"iters": 2})
    job_1, result_1 = run_job(pretrain, world, SEG, 0, raw=raw, record=record_1, seed=1,
                              models_root=world["root"] / "seeds")
    job_0, _ = run_job(pretrain, world, SEG, 0, raw=raw, record=record_0, seed=0,
                       models_root=world["root"] / "seeds")
    assert result_1["model_path"] == world["root"] / "seeds" / "seed1" / "pretrain" / f"seg{SEG}" / "model.pt"
    assert (job_0.hyper["seed"], job_1.hyper["seed"]) == (0, 1) and job_1.hyper["study_seed"] == 1
    assert job_1.run_name.endswith("-seed1")
    # another seed draws other crops and another init
    assert not torch.equal(record_0[0][1]["image"], record_1[0][1]["image"])


def test_single_person_teacher_data_drops_two_instance_composites(world, pretrained):
    params = parse_params(make_params(teacher={"single_person": True}))
    job = teacher.build_job(args_for(world, 0, N_MAT), params, CPU)
    metas = [job.dataset.reader.meta(k) for k in job.dataset.reader.keys]
    assert metas and all(len(m["fg_keys"]) == 1 for m in metas)
    both = teacher.build_job(args_for(world, 0, N_MAT), parse_params(make_params()), CPU)
    assert any(len(both.dataset.reader.meta(k)["fg_keys"]) == 2 for k in both.dataset.reader.keys)


def test_boundary_head_lr_multiplier_and_loss_knobs(world, pretrained):
    raw = make_params(teacher={"boundary_head_lr": 10.0, "matte_loss": "mse", "lambda_boundary": 0.1,
                               "boundary_pos_weight": 5.0})
    job = teacher.build_job(args_for(world, SEG, MAT), parse_params(raw), CPU)
    groups = job.optimizer_parameters()
    head = {id(p) for p in job.model.boundary_head.parameters()}
    assert {id(p) for p in groups[1]["params"]} == head and groups[1]["lr"] == pytest.approx(10 * 3e-3)
    assert not head & {id(p) for p in groups[0]["params"]}
    batch = {"alpha": torch.rand(2, 1, 32, 32), "fg": torch.rand(2, 3, 32, 32), "bg": torch.rand(2, 3, 32, 32)}
    terms = job.objective(job.model(torch.rand(2, 3, 32, 32)), batch)
    assert "mse" in terms and "laplacian" not in terms
    torch.testing.assert_close(terms["total"], terms["matte"] + 0.1 * terms["boundary_bce"])
    plain = teacher.build_job(args_for(world, SEG, MAT), parse_params(make_params()), CPU)
    assert plain.optimizer_parameters is None


def test_backbone_weights_param_initialises_networks_trained_from_scratch(world, tmp_path, capsys):
    from tests.core.models.test_pretrained import torchvision_resnet_state

    r18 = tmp_path / "resnet18.pth"
    torch.save(torchvision_resnet_state(False, (2, 2, 2, 2)), r18)
    raw = make_params()
    raw["model"] = {"network": "unet_r18", "backbone_weights": str(r18)}
    job = pretrain.build_job(args_for(world, SEG, 0), parse_params(raw), CPU)
    state = torch.load(r18, weights_only=True)
    torch.testing.assert_close(job.model.encoder.layer2[0].conv1.weight, state["layer2.0.conv1.weight"])
    assert job.run_params["init_from"] == str(r18) and "backbone_sha256" in job.fingerprint_extra
    assert "loaded 120/126 backbone tensors" in capsys.readouterr().out
    # a ResNet-18 file cannot initialise a ResNet-50: a required load stops with the reason
    raw["model"]["network"] = "unet_r50"
    with pytest.raises(StageError, match="model.backbone_weights: .*ResNet-18"):
        pretrain.build_job(args_for(world, SEG, 0), parse_params(raw), CPU)
    raw["model"]["backbone_weights"] = str(tmp_path / "absent.pth")
    with pytest.raises(StageError, match="absent.pth does not exist"):
        pretrain.build_job(args_for(world, SEG, 0), parse_params(raw), CPU)
    # a student of another architecture than the file (the paper's r18x0.5 student beside an
    # r101 file) says so and starts from scratch instead of failing
    from matting_core.models import build_network
    from matting_pipeline.jobs import init_backbone

    raw["model"] = {"network": "unet_r50", "backbone_weights": str(r18)}
    assert init_backbone(build_network("unet_r50"), parse_params(raw), required=False) == {}
    assert "backbone weights not used" in capsys.readouterr().out


def test_a_corrupted_resumable_state_is_ignored_with_a_message(world, capsys):
    from tests.core.test_checkpoint import _flip_tensor_bytes

    raw = make_params(teacher={"iters": 4, "checkpoint_every": 2})
    root = world["root"] / "corrupt-state"
    with pytest.raises(RuntimeError, match="injected"):
        run_job(teacher, world, 0, MAT, raw=raw, fail_at=3, models_root=root)
    state = root / "seed0" / "teacher" / f"seg0-mat{MAT}" / "state.pt"
    weights = torch.load(state, weights_only=True)["model"]
    _flip_tensor_bytes(state, max(weights.values(), key=lambda t: t.numel()))
    capsys.readouterr()
    record = []
    run_job(teacher, world, 0, MAT, raw=raw, record=record, models_root=root)
    out = capsys.readouterr().out
    assert "ignoring" in out and "its weights do not match the digest" in out
    assert [s for s, _, _ in record] == [1, 2, 3, 4]  # started over, not from the corrupt step 2


def test_a_stage_instance_being_trained_by_a_live_process_is_refused(world, pretrained):
    """A second process on the same stage instance is refused at once; the lock dies with its holder."""
    from matting_pipeline.trainer import LOCK_NAME

    raw = make_params(teacher={"iters": 2})
    root = world["root"] / "locked"
    lock = root / "seed0" / "teacher" / f"seg0-mat{MAT}" / LOCK_NAME
    lock.parent.mkdir(parents=True)
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, os, sys, time\n"
        f"fd = os.open({str(lock)!r}, os.O_RDWR | os.O_CREAT)\n"
        "fcntl.flock(fd, fcntl.LOCK_EX)\nos.write(fd, str(os.getpid()).encode())\n"
        "print('locked', flush=True)\ntime.sleep(600)\n")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(StageError, match=rf"another process \(pid {holder.pid}\) is training .*seg0-mat{MAT}"):
            run_job(teacher, world, 0, MAT, raw=raw, models_root=root)
        assert not (lock.parent / "model.pt").exists() and not (lock.parent / "state.pt").exists()
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
        time.sleep(0.1)
        _, result = run_job(teacher, world, 0, MAT, raw=raw, models_root=root)  # the kernel dropped the lock
        assert result["model_path"].is_file()
    finally:
        if holder.poll() is None:
            holder.kill()

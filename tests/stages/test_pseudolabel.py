"""The ``pseudolabel`` stage on a local 2-CPU Ray, on tiny shards made here.

One Ray for the module (started through the stage's own ``connect_ray``, as a local run
would); one tiny randomly initialised teacher whose heads are scaled up so the boundary
probability spans [0, 1] and the blend identity is not trivially 0.5 everywhere.

Checks: every subset key exactly once, in order; image/mask bytes copied; the stored blended
label equals ``blend_labels`` of the stored teacher maps within the uint16 quantisation;
labels equal the in-process function; an actor SIGKILLed mid-job is restarted and the job
still writes each key once (byte-identical to an undisturbed run); an exception or a
SIGKILL mid-write leaves no output directory (and an old output intact).
"""

from __future__ import annotations

import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
from argparse import Namespace
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from matting_core.blending import blend_labels
from matting_core.checkpoint import load_model, save_checkpoint
from matting_core.models import build_network
from matting_core.pseudolabel import label_images
from stages import pseudolabel as stage
from matting_pipeline.config import PseudolabelConfig, load_params
from matting_pipeline.shards import (
    iter_encoded_samples,
    iter_samples,
    read_index,
    seeded_order,
    subset_keys,
    write_shard_set,
)

pytestmark = pytest.mark.filterwarnings(
    "ignore:.*deprecated.*:DeprecationWarning:ray.data.context"  # Ray's own DataContext copy
)

REPO = Path(__file__).resolve().parents[2]
N_SEG = 40
SAMPLES_PER_SHARD = 8
QUANT = 1.0 / 65535.0


# ----------------------------------------------------------------------------- fixtures


def _seg_samples(n: int, seed: int = 0):
    """Random RGB images with a rectangle mask; every 5th sample has another size."""
    rng = np.random.default_rng(seed)
    samples = []
    for i in range(n):
        h, w = (36, 44) if i % 5 else (29, 50)
        image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        mask = np.zeros((h, w), np.uint8)
        mask[h // 4 : 3 * h // 4, w // 3 :] = 1
        samples.append((f"seg-{i:06d}", {"set": "seg", "stem": f"photo {i}"}, {"image": image, "mask": mask}))
    return samples


def _tiny_teacher(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    net = build_network("unet_r18x0.25")
    with torch.no_grad():  # spread the heads so alpha and beta cover [0, 1]
        net.alpha_head.weight.normal_(0, 0.5)
        net.boundary_head.weight.normal_(0, 0.5)
    return net


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("pseudolabel")
    samples = _seg_samples(N_SEG)
    order = seeded_order([s[0] for s in samples], 0, "seg")
    position = {k: i for i, k in enumerate(order)}
    samples.sort(key=lambda s: position[s[0]])  # like the shard stage: storage order = seeded order
    write_shard_set(root / "data/shards/seg", "seg", samples, SAMPLES_PER_SHARD, subset_seed=0, order=order)
    teacher = _tiny_teacher()
    for cell in ("seg24-mat4", "seg16-mat4"):
        save_checkpoint(root / "models/seed0/teacher" / cell / "model.pt", teacher)
    params = {
        "shard": {"samples_per_shard": SAMPLES_PER_SHARD},
        "pseudolabel": {"num_actors": 2, "batch_size": 4, "num_cpus": 2},
    }
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    return root


@pytest.fixture(scope="module")
def ray_local():
    import ray

    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("RAY_ADDRESS", raising=False)
        started = stage.connect_ray(PseudolabelConfig(num_cpus=2))
    yield ray
    if started:
        ray.shutdown()


def _args(root: Path, seg: int, mat: int = 4, force: bool = True) -> Namespace:
    return Namespace(
        seg=seg, mat=mat, params=str(root / "params.yaml"), data_root=str(root / "data"),
        models_root=str(root / "models"), force=force, no_progress=False, seed=0,
    )


def _out_dir(root: Path, seg: int, mat: int = 4) -> Path:
    return root / "data/pseudolabels/seed0" / f"seg{seg}-mat{mat}"


def _shard_digests(out_dir: Path) -> dict[str, str]:
    return {s["name"]: s["sha256"] for s in read_index(out_dir)["shards"]}


@pytest.fixture(scope="module")
def labelled(workspace, ray_local):
    """The reference run: seg24-mat4 labelled once, undisturbed."""
    assert stage.run(_args(workspace, 24)) == 0
    return _out_dir(workspace, 24)


# ----------------------------------------------------------------------------- pure pieces


def test_actor_resources_cpu_share_leaves_room_for_readers():
    res = stage.actor_resources(PseudolabelConfig(num_actors=2), {"CPU": 2.0})
    assert res.device == "cpu" and res.num_gpus == 0 and res.num_actors == 2
    assert res.num_cpus * 2 + 0.25 <= 2.0 and res.torch_threads == 1
    assert stage.actor_resources(PseudolabelConfig(num_actors=1), {"CPU": 2.0}).torch_threads == 2
    assert stage.actor_resources(PseudolabelConfig(num_actors=2), {"CPU": 16.0}).torch_threads == 8


def test_actor_resources_one_gpu_per_actor_capped_at_the_gpus():
    res = stage.actor_resources(PseudolabelConfig(num_actors=8, gpus_per_actor=1.0), {"CPU": 16.0, "GPU": 4.0})
    assert (res.device, res.num_gpus, res.num_cpus, res.num_actors) == ("cuda", 1.0, 1.0, 4)
    assert res.notes  # says it capped the pool
    cpu_only = stage.actor_resources(PseudolabelConfig(gpus_per_actor=0), {"CPU": 4.0, "GPU": 1.0})
    assert cpu_only.device == "cpu"


def test_actor_resources_refuses_a_cluster_too_small():
    with pytest.raises(stage.PseudolabelError, match="CPU"):
        stage.actor_resources(PseudolabelConfig(read_cpus=1.0), {"CPU": 1.0})
    capped = stage.actor_resources(PseudolabelConfig(num_actors=4, cpus_per_actor=1.0), {"CPU": 2.0})
    assert capped.num_actors == 1


def test_label_images_is_the_shared_mlb_function_per_size_group():
    teacher = _tiny_teacher().eval()
    samples = _seg_samples(6)[:: 2] + _seg_samples(1)  # sizes (29, 50) and (36, 44), mixed
    images = [s[2]["image"] for s in samples]
    masks = [s[2]["mask"].astype(np.float32) for s in samples]
    with torch.no_grad():
        preds = [teacher(torch.from_numpy(im.transpose(2, 0, 1)[None].astype(np.float32) / 255)) for im in images]
    for mode, dilate in (("soft", 0), ("hard", 1)):
        out = label_images(teacher, images, masks, mode=mode, dilate=dilate, max_batch=2)
        for image, mask, pred, labels in zip(images, masks, preds, out):
            assert labels["blended"].shape == image.shape[:2]
            # batched vs single forward: float rounding differs by ~1e-5 (scaled-up heads)
            np.testing.assert_allclose(labels["teacher_alpha"], pred["alpha"][0, 0].numpy(), atol=2e-4)
            np.testing.assert_allclose(
                labels["teacher_boundary"], torch.sigmoid(pred["boundary_logits"])[0, 0].numpy(), atol=2e-4
            )
            expected = blend_labels(labels["teacher_alpha"], labels["teacher_boundary"], mask, mode, dilate)
            np.testing.assert_allclose(labels["blended"], expected, atol=1e-6)


def test_key_mismatch_lists_missing_extra_and_repeated():
    got = stage.key_mismatch(["a", "b", "c"], ["a", "a", "c", "z"])
    assert got == {"missing": ["b"], "extra": ["z"], "repeated": ["a"]}


def test_write_labels_refuses_a_mismatch_and_writes_nothing(tmp_path):
    plan = stage.Plan(
        seg_count=2, mat_count=1, cell="seg2-mat1", seg_dir=tmp_path, out_dir=tmp_path / "out",
        teacher_path=tmp_path / "t.pt", teacher_sha256="0", keys=("k1", "k2"), shard_paths=(),
        samples_per_shard=1, subset_seed=0, blend_mode="soft", blend_dilate=0, amp=False, fingerprint="f",
    )
    from matting_pipeline.shards import encode_member

    png = encode_member("blended", np.zeros((2, 2), np.float32))[1]
    row = {role: png for role in ("image", "mask", *stage.LABEL_ROLES)}
    row["image"] = encode_member("image", np.zeros((2, 2, 3), np.uint8))[1]
    row["mask"] = encode_member("mask", np.zeros((2, 2), np.uint8))[1]

    def batch(keys):
        out = {"key": np.array(keys, dtype=object), "meta": np.array([b"{}"] * len(keys), dtype=object)}
        for role, data in row.items():
            out[role] = np.array([data] * len(keys), dtype=object)
        return out

    with pytest.raises(stage.PseudolabelError, match=r"1 missing: k2.*1 extra: k9.*1 repeated: k1"):
        stage.write_labels(plan, [batch(["k1", "k1"]), batch(["k9"])], progress=False)
    assert not plan.out_dir.exists() and not list(tmp_path.glob(".out.*"))
    index = stage.write_labels(plan, [batch(["k2"]), batch(["k1"])], progress=False)
    assert index["keys"] == ["k2", "k1"] and index["order"] == ["k1", "k2"]


def test_bad_budgets_and_missing_teacher_fail_with_the_command_to_run(workspace, capsys):
    assert stage.run(_args(workspace, 0)) == 2
    assert "both budgets > 0" in capsys.readouterr().err
    assert stage.run(_args(workspace, 24, mat=9)) == 2
    assert "matting teacher --seg 24 --mat 9" in capsys.readouterr().err
    assert stage.run(_args(workspace, N_SEG + 1)) == 2
    assert "only 40" in capsys.readouterr().err


def test_ray_client_addresses_are_refused():
    # In a fresh interpreter: this module's fixture may already hold a Ray connection.
    code = (
        "from stages import pseudolabel as stage\n"
        "from matting_pipeline.config import PseudolabelConfig\n"
        "try:\n"
        "    stage.connect_ray(PseudolabelConfig())\n"
        "except stage.PseudolabelError as err:\n"
        "    print('refused:', err)\n"
    )
    env = {**os.environ, "RAY_ADDRESS": "ray://head:10001"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          cwd=Path(__file__).resolve().parents[2], timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "refused:" in proc.stdout and "Ray Client" in proc.stdout


# ----------------------------------------------------------------------------- on Ray


@pytest.mark.slow
def test_every_subset_key_once_with_the_blend_identity(workspace, labelled, capsys):
    seg_dir = workspace / "data/shards/seg"
    keys = subset_keys(seg_dir, 24)
    index = read_index(labelled)
    assert index["count"] == 24 and index["keys"] == keys and index["order"] == keys
    assert [s["count"] for s in index["shards"]] == [8, 8, 8]
    assert [s["name"] for s in index["shards"]] == [f"seg24-mat4-{i:06d}.tar" for i in range(3)]

    seg = {s["key"]: s["members"] for s in iter_encoded_samples(seg_dir, keys)}
    for sample in iter_encoded_samples(labelled):  # verifies sha256 and member names
        assert set(sample["members"]) == {"meta", "image", "mask", "teacher_alpha", "teacher_boundary", "blended"}
        assert sample["members"]["image"] == seg[sample["key"]]["image"]
        assert sample["members"]["mask"] == seg[sample["key"]]["mask"]
        assert sample["meta"]["stem"] == f"photo {int(sample['key'][4:])}"
        assert sample["meta"]["pseudolabel"]["blend_mode"] == "soft"

    samples = list(iter_samples(labelled))
    teacher, _ = load_model(workspace / "models/seed0/teacher/seg24-mat4/model.pt")
    direct = label_images(teacher, [s["image"] for s in samples], [s["mask"] for s in samples])
    spread = []
    for sample, ref in zip(samples, direct):
        recomputed = blend_labels(sample["teacher_alpha"], sample["teacher_boundary"], sample["mask"])
        # each stored map is within 0.5/65535 of the float, so the blend moves by at most ~1.5/65535
        assert np.abs(recomputed - sample["blended"]).max() <= 2 * QUANT
        for role in stage.LABEL_ROLES:  # same function; other batches round differently (~1e-5)
            assert np.abs(ref[role] - sample[role]).max() <= 5e-4
        spread.append(np.ptp(sample["teacher_boundary"]))
    assert max(spread) > 0.5  # the identity was tested on a non-trivial beta

    # up to date: a second run without --force does nothing
    assert stage.run(_args(workspace, 24, force=False)) == 0
    assert "up to date" in capsys.readouterr().out


def test_the_in_process_labels_are_the_ray_jobs(workspace, labelled, tmp_path):
    """label_in_process (benchmarks, training-throughput worlds) writes the keys, order,
    members and labels of the Ray job, without Ray."""
    plan = stage.make_plan(load_params(workspace / "params.yaml"), 24, 4, workspace / "data", workspace / "models")
    index = stage.label_in_process(plan, tmp_path / "local", batch_size=3)
    assert index["keys"] == read_index(labelled)["keys"] and index["order"] == read_index(labelled)["order"]
    ray_samples = {s["key"]: s for s in iter_samples(labelled)}
    for sample in iter_samples(tmp_path / "local"):
        ref = ray_samples[sample["key"]]
        assert sample["meta"]["pseudolabel"] == ref["meta"]["pseudolabel"]
        np.testing.assert_array_equal(sample["image"], ref["image"])
        for role in stage.LABEL_ROLES:  # other batch sizes round differently (~1e-5)
            assert np.abs(sample[role] - ref[role]).max() <= 5e-4


@pytest.mark.slow
def test_actor_killed_mid_job_is_retried_and_every_key_written_once(workspace, labelled, monkeypatch, tmp_path):
    reference = _shard_digests(labelled)
    marker = tmp_path / "killed"
    monkeypatch.setenv(stage.KILL_ONCE_ENV, f"{marker}:2")  # an actor dies at its 2nd batch
    assert stage.run(_args(workspace, 24)) == 0
    assert marker.is_file(), "no actor was killed: the test did not exercise the retry"
    killed_pid = int(marker.read_text())
    with pytest.raises(ProcessLookupError):
        os.kill(killed_pid, 0)
    index = read_index(labelled)
    assert index["count"] == 24 and len(set(index["keys"])) == 24
    assert _shard_digests(labelled) == reference  # same bytes as the undisturbed run


@pytest.mark.slow
def test_exception_mid_write_keeps_the_previous_labels_whole(workspace, labelled, monkeypatch):
    reference = _shard_digests(labelled)
    monkeypatch.setenv(stage.AFTER_SHARD_ENV, "raise:1")  # fails after the 1st of 3 shards
    with pytest.raises(RuntimeError, match="injected failure"):
        stage.run(_args(workspace, 24))
    assert _shard_digests(labelled) == reference and read_index(labelled)["count"] == 24
    assert not list(labelled.parent.glob(f".{labelled.name}.*"))  # no temp dir left behind


def _read_lines(stream, lines: queue.Queue) -> None:
    for line in stream:
        lines.put(line)


@pytest.mark.slow
def test_driver_killed_mid_write_leaves_no_output(workspace, ray_local):
    """A CLI run that joined this Ray (RAY_ADDRESS) is SIGKILLed after its first shard.

    Covers ``python -m stages.pseudolabel`` and joining a cluster (code shipped as py_modules).
    A stale temp dir stays behind; the next run's ``atomic_dir`` removes it.
    """
    out = _out_dir(workspace, 16)
    shutil.rmtree(out, ignore_errors=True)
    env = {
        **os.environ,
        "RAY_ADDRESS": ray_local.get_runtime_context().gcs_address,
        stage.AFTER_SHARD_ENV: "hang:1",
    }
    cmd = [sys.executable, "-m", "stages.pseudolabel", *_cli(workspace, 16)]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=_read_lines, args=(proc.stderr, lines), daemon=True).start()
    seen, deadline = [], time.monotonic() + 240
    try:
        while time.monotonic() < deadline:
            try:
                line = lines.get(timeout=1)
            except queue.Empty:
                assert proc.poll() is None, "stage exited early:\n" + "".join(seen[-30:])
                continue
            seen.append(line)
            if "hanging after 1 shard" in line:
                break
        else:
            pytest.fail("no shard was written in time:\n" + "".join(seen[-30:]))
        partial = list(out.parent.glob(f".{out.name}.*.tmp"))
        assert partial and list(partial[0].glob("*.tar")), "the run was not mid-write"
        assert not out.exists()
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    assert not out.exists(), "a killed run must not leave labels behind"


def _cli(root: Path, seg: int, mat: int = 4) -> list[str]:
    return [
        "--seg", str(seg), "--mat", str(mat), "--params", str(root / "params.yaml"),
        "--data-root", str(root / "data"), "--models-root", str(root / "models"), "--force",
    ]


def test_params_file_of_the_fixture_is_valid(workspace):
    assert load_params(workspace / "params.yaml").pseudolabel.batch_size == 4

"""matting_core.checkpoint: weights_only round trips, atomic writes, resumable state."""

from __future__ import annotations

import pickle
import random

import numpy as np
import pytest
import torch

from matting_core.checkpoint import (
    CheckpointError,
    load_model,
    load_training_state,
    read_checkpoint,
    save_checkpoint,
    save_training_state,
)
from matting_core.models import build_network, network_spec


class NotAllowed:
    """A class that only full pickle can restore."""

    def __init__(self) -> None:
        self.value = 1


def _tiny():
    torch.manual_seed(0)
    return build_network("unet_r18x0.25")


def test_model_round_trip_with_weights_only(tmp_path):
    model = _tiny().eval()
    # make BN statistics non-trivial so buffers are checked too
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
    path = save_checkpoint(
        tmp_path / "sub" / "model.pt",
        model,
        model.network_spec,
        {"stage": "teacher", "step": 5, "metrics": {"mse": np.float32(0.25)}, "shape": (1, 2), "none": None},
    )
    raw = torch.load(path, weights_only=True)  # plain containers only
    assert raw["network_spec"] == network_spec("unet_r18x0.25")
    loaded, info = load_model(path)
    assert not loaded.training
    assert info["network_spec"]["name"] == "unet_r18x0.25"
    assert info["extra"] == {"stage": "teacher", "step": 5, "metrics": {"mse": 0.25}, "shape": (1, 2), "none": None}
    image = torch.rand(1, 3, 37, 41)
    with torch.inference_mode():
        torch.testing.assert_close(loaded(image)["alpha"], model(image)["alpha"], rtol=0, atol=0)
    assert [p.name for p in path.parent.iterdir()] == ["model.pt"]  # no temp files left


def test_spec_defaults_to_the_models_own(tmp_path):
    model = build_network("unet_r18x0.25", aspp_rates=(2, 3))
    _, info = load_model(save_checkpoint(tmp_path / "m.pt", model))
    assert info["network_spec"]["aspp_rates"] == [2, 3]
    bare = torch.nn.Conv2d(3, 1, 1)
    with pytest.raises(ValueError, match="network_spec"):
        save_checkpoint(tmp_path / "x.pt", bare)


def test_pickle_only_objects_are_refused(tmp_path):
    model = _tiny()
    with pytest.raises(TypeError, match=r"extra\['obj'\]: NotAllowed"):
        save_checkpoint(tmp_path / "m.pt", model, extra={"obj": NotAllowed()})
    assert not list(tmp_path.iterdir())

    evil = tmp_path / "evil.pt"
    torch.save({"format": "matting-model", "version": 1, "network_spec": model.network_spec,
                "state_dict": model.state_dict(), "extra": {"obj": NotAllowed()}}, evil)
    with pytest.raises(CheckpointError, match=r"evil.pt cannot be read as a checkpoint \(.*Unpickl|evil.pt cannot"):
        load_model(evil)
    assert pickle  # the refusal comes from torch's weights_only unpickler


def test_failed_save_keeps_the_previous_file(tmp_path):
    model = _tiny()
    path = save_checkpoint(tmp_path / "m.pt", model, extra={"version": "old"})
    with pytest.raises(TypeError):
        save_checkpoint(path, model, extra={"version": object()})
    assert load_model(path)[1]["extra"] == {"version": "old"}
    assert [p.name for p in tmp_path.iterdir()] == ["m.pt"]


def test_foreign_files_are_rejected(tmp_path):
    path = tmp_path / "weights.pt"
    torch.save({"conv.weight": torch.zeros(1)}, path)
    with pytest.raises(ValueError, match="not a matting checkpoint"):
        load_model(path)


def _flip_tensor_bytes(path, tensor, count=4000):
    """Flip bytes inside ``tensor``'s stored data (torch.load itself does not notice)."""
    raw = bytearray(path.read_bytes())
    data = bytes(tensor.detach().untyped_storage().tolist()[:64])  # as stored (channels-last or not)
    at = raw.find(data[:64])
    assert at > 0, "tensor bytes not found in the file"
    for i in range(at, at + min(count, tensor.numel() * tensor.element_size())):
        raw[i] ^= 0x5A
    path.write_bytes(bytes(raw))


def test_corrupted_weights_are_refused_naming_the_file(tmp_path):
    model = _tiny()
    path = save_checkpoint(tmp_path / "model.pt", model)
    biggest = max(model.state_dict().values(), key=lambda t: t.numel())
    _flip_tensor_bytes(path, biggest)
    torch.load(path, weights_only=True)  # torch reads it happily: only the digest tells
    with pytest.raises(CheckpointError, match=r"model.pt: its weights do not match the digest"):
        load_model(path)


def test_corrupted_training_state_is_refused(tmp_path):
    model = _tiny()
    optimizer = torch.optim.Adam(model.parameters())
    path = save_training_state(tmp_path / "state.pt", model, optimizer, step=3)
    _flip_tensor_bytes(path, max(model.state_dict().values(), key=lambda t: t.numel()))
    with pytest.raises(CheckpointError, match="state.pt: its weights do not match"):
        load_training_state(path, _tiny())


def test_truncated_file_and_old_version_1_files(tmp_path):
    model = _tiny()
    path = save_checkpoint(tmp_path / "model.pt", model)
    path.write_bytes(path.read_bytes()[:2000])
    with pytest.raises(CheckpointError, match="model.pt cannot be read as a checkpoint"):
        load_model(path)
    old = tmp_path / "v1.pt"  # written before the digest existed: still loads
    torch.save({"format": "matting-model", "version": 1, "network_spec": model.network_spec,
                "state_dict": model.state_dict(), "extra": {}}, old)
    loaded, _ = load_model(old)
    torch.testing.assert_close(loaded.state_dict(), model.state_dict())
    stripped = tmp_path / "v2-no-digest.pt"
    torch.save({"format": "matting-model", "version": 2, "network_spec": model.network_spec,
                "state_dict": model.state_dict(), "extra": {}}, stripped)
    with pytest.raises(CheckpointError, match="without its weights digest"):
        load_model(stripped)


def _train_steps(model, optimizer, scheduler, rng, steps):
    for _ in range(steps):
        image = torch.from_numpy(rng.random((2, 3, 32, 32), dtype=np.float32))
        noise = torch.rand(1) * 0.01 + random.random() * 0.01  # uses torch and python RNGs
        loss = (model(image)["alpha"] - 0.5 - noise).abs().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()


def _setup():
    model = _tiny().train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=10)
    return model, optimizer, scheduler


def test_training_state_resumes_exactly(tmp_path):
    # reference: 3 uninterrupted steps (the 2 after the save use Adam's saved moments)
    model, optimizer, scheduler = _setup()
    torch.manual_seed(1), random.seed(1)
    rng = np.random.default_rng(1)
    _train_steps(model, optimizer, scheduler, rng, 1)
    path = save_training_state(tmp_path / "state.pt", model, optimizer, scheduler, step=1, numpy_rng=rng,
                               extra={"run": "teacher-r18x0.25"})
    _train_steps(model, optimizer, scheduler, rng, 2)
    reference = {k: v.clone() for k, v in model.state_dict().items()}

    # resume in a "new process": fresh objects, different RNG states
    model2, optimizer2, scheduler2 = _setup()
    torch.manual_seed(99), random.seed(99)
    rng2 = np.random.default_rng(99)
    step = load_training_state(path, model2, optimizer2, scheduler2, numpy_rng=rng2)
    assert step == 1
    assert scheduler2.last_epoch == 1
    _train_steps(model2, optimizer2, scheduler2, rng2, 2)
    for key, value in model2.state_dict().items():
        torch.testing.assert_close(value, reference[key], rtol=0, atol=0, msg=key)

    payload = read_checkpoint(path)
    assert payload["extra"] == {"run": "teacher-r18x0.25"}
    raw = torch.load(path, weights_only=True)
    assert raw["rng"]["torch"].dtype == torch.uint8


def test_training_state_restores_every_rng(tmp_path):
    model, optimizer, scheduler = _setup()
    rng = np.random.default_rng(123)
    np.random.seed(5)
    path = save_training_state(tmp_path / "s.pt", model, optimizer, scheduler, step=7, numpy_rng=rng)
    expected = (torch.rand(3), rng.random(3), random.random(), np.random.rand())
    torch.manual_seed(0), random.seed(0), np.random.seed(0)
    other = np.random.default_rng(0)
    load_training_state(path, model, optimizer, scheduler, numpy_rng=other)
    got = (torch.rand(3), other.random(3), random.random(), np.random.rand())
    torch.testing.assert_close(got[0], expected[0])
    np.testing.assert_array_equal(got[1], expected[1])
    assert got[2:] == expected[2:]


def test_training_state_extra_modules_and_model_loading(tmp_path):
    model, optimizer, scheduler = _setup()
    ema = _tiny()
    with torch.no_grad():
        next(ema.parameters()).fill_(0.5)
    path = save_training_state(tmp_path / "s.pt", model, optimizer, scheduler, step=3, modules={"ema_teacher": ema})
    ema2 = _tiny()
    load_training_state(path, _tiny(), modules={"ema_teacher": ema2}, restore_rng=False)
    assert torch.all(next(ema2.parameters()) == 0.5)
    with pytest.raises(KeyError, match="ema_teacher"):
        load_training_state(tmp_path / "s.pt", _tiny(), modules={"nope": ema2})
    loaded, info = load_model(path)  # a training state also rebuilds the model
    assert info["step"] == 3
    model_ckpt = save_checkpoint(tmp_path / "m.pt", model)
    with pytest.raises(ValueError, match="not a training state"):
        load_training_state(model_ckpt, model)

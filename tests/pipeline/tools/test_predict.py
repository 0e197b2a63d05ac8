"""`matting predict`: same-size 8-bit alpha PNGs, composites, messy inputs, exit codes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from matting_core.checkpoint import load_model, save_checkpoint
from matting_core.inference import predict_alpha
from matting_core.models import build_network
from matting_pipeline.cli import main
from matting_pipeline.tools.predict import output_names, parse_colour
from tests.images import rgb, save, save_exif_rotated, save_truncated

SHORT = 48


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = build_network("unet_r18x0.25")
    with torch.no_grad():  # a non-constant matte: alpha follows the red channel
        model.alpha_head.weight.normal_(0, 0.05)
    path = save_checkpoint(tmp_path_factory.mktemp("ckpt") / "model.pt", model, extra={"stage": "test"})
    yield path
    torch.set_num_threads(threads)


def _predict(checkpoint, inp, out, *extra):
    return main(["predict", "--checkpoint", str(checkpoint), "--input", str(inp), "--output", str(out),
                 "--short-side", str(SHORT), "--device", "cpu", *extra])


def test_folder_of_messy_inputs(tmp_path, checkpoint, capsys):
    src = tmp_path / "in"
    save(src / "plain.png", rgb(40, 64, 1))
    save(src / "sub" / "gray.jpg", rgb(30, 20, 2)[..., 0], "JPEG", quality=90)
    save(src / "rgba.png", np.dstack([rgb(33, 35, 3), np.full((33, 35), 128, np.uint8)]))
    save(src / "wide16.png", rgb(24, 50, 4)[..., 1].astype(np.uint16) * 257)
    save(src / "cmyk.jpg", Image.fromarray(rgb(26, 26, 5)).convert("CMYK"), "JPEG", quality=95)
    save_exif_rotated(src / "exif.jpg", rgb(20, 36, 6))  # displayed 20x36, stored 36x20
    save_truncated(src / "broken.png", rgb(40, 40, 7))
    (src / "notes.txt").write_text("not an image\n")
    (src / "empty.png").write_bytes(b"")
    (src / ".hidden.png").write_bytes(b"junk")

    assert _predict(checkpoint, src, tmp_path / "out", "--composite", "#00ff00") == 0
    captured = capsys.readouterr()
    expected_sizes = {
        "plain.png": (40, 64), "sub/gray.png": (30, 20), "rgba.png": (33, 35),
        "wide16.png": (24, 50), "cmyk.png": (26, 26), "exif.png": (20, 36),
    }
    for name, (h, w) in expected_sizes.items():
        alpha = Image.open(tmp_path / "out" / name)
        assert alpha.mode == "L" and alpha.size == (w, h), name
        comp = Image.open(tmp_path / "out" / name.replace(".png", ".composite.png"))
        assert comp.mode == "RGB" and comp.size == (w, h)
    written = sorted(p.relative_to(tmp_path / "out").as_posix() for p in (tmp_path / "out").rglob("*.png"))
    assert len(written) == 2 * len(expected_sizes)
    for bad in ("broken.png", "notes.txt", "empty.png"):
        assert f"skipped {src / bad}" in captured.err
    assert "truncated" in captured.err and "empty file" in captured.err
    assert ".hidden" not in captured.err
    assert "wrote 6 alpha matte(s)" in captured.out


def test_alpha_png_matches_the_core_prediction(tmp_path, checkpoint):
    image = rgb(50, 70, 9)
    save(tmp_path / "one.png", image)
    assert _predict(checkpoint, tmp_path / "one.png", tmp_path / "out") == 0
    written = np.asarray(Image.open(tmp_path / "out" / "one.png"))
    model, _ = load_model(checkpoint)
    expected = predict_alpha(model, image, short_side=SHORT)
    assert written.dtype == np.uint8 and written.shape == (50, 70)
    assert np.abs(written.astype(int) - np.round(expected * 255).astype(int)).max() <= 1
    assert written.std() > 0.5  # a real, non-constant matte
    assert not (tmp_path / "out" / "one.composite.png").exists()


def test_composite_over_colour_and_image(tmp_path, checkpoint):
    image = rgb(32, 40, 3)
    save(tmp_path / "in" / "a.png", image)
    model, _ = load_model(checkpoint)
    alpha = predict_alpha(model, image, short_side=SHORT)[..., None]
    assert _predict(checkpoint, tmp_path / "in", tmp_path / "c1", "--composite", "10,20,30") == 0
    got = np.asarray(Image.open(tmp_path / "c1" / "a.composite.png")).astype(float)
    want = alpha * image + (1 - alpha) * np.array([10, 20, 30])
    assert np.abs(got - want).max() <= 1.01
    bg = np.zeros((100, 10, 3), np.uint8)
    bg[..., 2] = 255
    save(tmp_path / "bg.png", bg)
    assert _predict(checkpoint, tmp_path / "in", tmp_path / "c2", "--composite", str(tmp_path / "bg.png")) == 0
    got = np.asarray(Image.open(tmp_path / "c2" / "a.composite.png")).astype(float)
    assert got.shape == (32, 40, 3)
    assert np.abs(got - (alpha * image + (1 - alpha) * np.array([0, 0, 255]))).max() <= 1.01


def test_exit_codes(tmp_path, checkpoint, capsys):
    bad = tmp_path / "bad"
    save_truncated(bad / "x.png", rgb(20, 20))
    (bad / "y.txt").write_text("no")
    assert _predict(checkpoint, bad, tmp_path / "out") == 1
    assert "no readable image" in capsys.readouterr().err
    assert _predict(checkpoint, tmp_path / "missing", tmp_path / "out") == 2
    save(tmp_path / "ok.png", rgb(20, 20))
    assert _predict(checkpoint, tmp_path / "ok.png", tmp_path / "out", "--composite", "not-a-colour") == 2
    assert "neither an existing image file nor a colour" in capsys.readouterr().err
    assert _predict(tmp_path / "nope.pt", tmp_path / "ok.png", tmp_path / "out") == 2


def test_name_clashes_keep_the_extension():
    from pathlib import Path

    names = output_names([Path("a.jpg"), Path("a.png"), Path("b.png"), Path("s/a.png")])
    assert [n.as_posix() for n in names] == ["a.jpg", "a.png", "b", "s/a"]


def test_parse_colour():
    assert parse_colour("white") == (255, 255, 255)
    assert parse_colour("#00ff00") == (0, 255, 0)
    assert parse_colour("1, 2, 3") == (1, 2, 3)
    with pytest.raises(ValueError):
        parse_colour("1,2,300")


def test_an_output_that_would_overwrite_an_input_is_refused(tmp_path, checkpoint, capsys):
    src = tmp_path / "photos"
    save(src / "GT01.png", rgb(40, 64, 1))
    save(src / "GT02.png", rgb(40, 64, 2))
    before = {p.name: p.read_bytes() for p in src.iterdir()}
    assert _predict(checkpoint, src, src) == 2
    err = capsys.readouterr().err
    assert "would overwrite input file(s)" in err and "GT01.png" in err and "choose another --output" in err
    assert {p.name: p.read_bytes() for p in src.iterdir()} == before  # nothing touched
    # a single file whose output name is itself
    assert _predict(checkpoint, src / "GT01.png", src) == 2
    assert (src / "GT01.png").read_bytes() == before["GT01.png"]


def test_an_output_folder_inside_the_input_is_never_read_as_input(tmp_path, checkpoint):
    src = tmp_path / "photos"
    save(src / "a.png", rgb(40, 64, 1))
    out = src / "alphas"
    assert _predict(checkpoint, src, out) == 0
    assert _predict(checkpoint, src, out) == 0  # again: alphas/a.png is not a photo
    assert sorted(p.relative_to(src).as_posix() for p in src.rglob("*.png")) == ["a.png", "alphas/a.png"]


def test_an_output_that_is_a_file_is_a_clear_error(tmp_path, checkpoint, capsys):
    save(tmp_path / "a.png", rgb(40, 64, 1))
    (tmp_path / "out.txt").write_text("not a folder")
    assert _predict(checkpoint, tmp_path / "a.png", tmp_path / "out.txt") == 2
    assert "is a file; give a folder" in capsys.readouterr().err


def test_an_absurd_short_side_is_refused_before_any_work(tmp_path, checkpoint, capsys):
    save(tmp_path / "a.png", rgb(20, 20, 1))
    assert _predict(checkpoint, tmp_path / "a.png", tmp_path / "out", "--short-side", "100000") == 2
    assert "--short-side must be between 1 and 8192 px, got 100000" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_an_animated_gif_says_which_frame_its_matte_is_of(tmp_path, checkpoint, capsys):
    frames = [Image.fromarray(rgb(32, 40, seed)) for seed in (1, 2, 3)]
    gif = tmp_path / "in" / "wave.gif"
    gif.parent.mkdir()
    frames[0].save(gif, save_all=True, append_images=frames[1:], duration=100, loop=0)
    assert _predict(checkpoint, gif.parent, tmp_path / "out") == 0
    assert f"{gif}: animated image, used the first of 3 frames" in capsys.readouterr().err
    assert Image.open(tmp_path / "out" / "wave.png").size == (40, 32)


@pytest.mark.parametrize("output", ["/proc/matting-predict-out", "/proc/self/matting-out"])
def test_an_output_under_proc_is_a_clear_error(tmp_path, checkpoint, capsys, output):
    save(tmp_path / "a.png", rgb(20, 20, 1))
    assert _predict(checkpoint, tmp_path / "a.png", output) == 2
    err = capsys.readouterr().err
    assert f"--output {output} is not a writable folder" in err and "Traceback" not in err


def _photo(path, side: int) -> None:
    import cv2

    y, x = np.mgrid[:side, :side].astype(np.float32) / side
    image = np.stack([255 * x, 255 * y, 128 + 100 * np.sin(20 * x * y)], -1)
    image += np.random.default_rng(0).normal(0, 8, image.shape).astype(np.float32)
    cv2.imwrite(str(path), np.clip(image, 0, 255).astype(np.uint8), [cv2.IMWRITE_JPEG_QUALITY, 90])


def _peak_rss_bytes(args) -> int:
    """Peak resident memory of `matting predict ARGS` in a fresh interpreter: its own VmHWM
    (wait4's ru_maxrss would report the forking pytest's size)."""
    import subprocess
    import sys

    code = ("import sys, re; from matting_pipeline.cli import main; rc = main(['predict', *sys.argv[1:]]); "
            "print(re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read()).group(1)); sys.exit(rc)")
    result = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    return int(result.stdout.split()[-1]) * 1024


def test_a_huge_photo_with_a_composite_costs_a_few_bytes_per_pixel(tmp_path, checkpoint):
    """Issue 16 item 8: a 13000x13000 photo with --composite peaked at 8.2 GB (about 45
    bytes per pixel: float copies of the photo, the alpha and the composite). Now the photo
    (3 B/px) and the 8-bit alpha (1 B/px) are the only full-size arrays: the bound measured
    here on 16 MP is 12 B/px over the fixed cost of a small photo (benchmarks/bench_predict_memory.py
    measures 169 MP)."""
    side = 4000
    _photo(tmp_path / "big.jpg", side)
    _photo(tmp_path / "small.jpg", 400)
    common = ["--checkpoint", str(checkpoint), "--short-side", str(SHORT), "--device", "cpu", "--composite", "#00ff00"]
    small = _peak_rss_bytes(["--input", str(tmp_path / "small.jpg"), "--output", str(tmp_path / "s"), *common])
    big = _peak_rss_bytes(["--input", str(tmp_path / "big.jpg"), "--output", str(tmp_path / "b"), *common])
    per_pixel = (big - small) / side**2
    print(f"peak {big / 2**20:.0f} MB (small photo {small / 2**20:.0f} MB): {per_pixel:.1f} B/px")
    assert per_pixel < 12, f"{per_pixel:.1f} bytes per pixel above a small photo's peak"
    alpha = np.asarray(Image.open(tmp_path / "b" / "big.png"))
    composite = np.asarray(Image.open(tmp_path / "b" / "big.composite.png"))
    assert alpha.shape == (side, side) and composite.shape == (side, side, 3)

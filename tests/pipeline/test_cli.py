"""The `matting` command line: help lists every command, unknown ones fail clearly."""

import subprocess
import sys

from matting_pipeline import cli


def test_help_lists_commands(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in ("ingest", "shard", "composite", "teacher", "predict", "export"):
        assert name in out


def test_no_arguments_prints_help_and_fails(capsys):
    assert cli.main([]) == 2
    assert "commands:" in capsys.readouterr().out


def test_unknown_command_names_choices(capsys):
    try:
        cli.main(["trian"])
    except SystemExit as exc:
        assert exc.code == 2
    assert "unknown command 'trian'" in capsys.readouterr().err


def test_console_script_installed():
    exe = subprocess.run(
        [sys.executable, "-c", "import shutil,sys; print(shutil.which('matting', path=sys.prefix + '/bin'))"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()
    assert exe != "None"
    result = subprocess.run([exe, "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "Label-efficient" in result.stdout


# ----------------------------------------------------------------------------- params errors


def _params(tmp_path, **sections):
    """The project's params.yaml with ``sections`` merged in, written to tmp_path."""
    import yaml

    from tests.e2e.tiny import REPO, deep_update

    raw = deep_update(yaml.safe_load((REPO / "params.yaml").read_text()), sections)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _stage(tmp_path, stage, params, *extra):
    return subprocess.run(
        [sys.executable, "-m", f"stages.{stage}", "--params", str(params), *extra],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )


def test_params_errors_are_one_sentence_in_every_stage(tmp_path):
    """Issue 16 item 7: a bad params key reads as the key and the fix, never a traceback."""
    params = _params(tmp_path, composite={"bogus": 3}, evaluate={"short_side": "abc"})
    for stage, extra in [("ingest", ()), ("shard", ()), ("composite", ()), ("evaluate", ("--seg", "240", "--mat", "32")),
                         ("pretrain", ("--seg", "240"))]:
        result = _stage(tmp_path, stage, params, *extra)
        assert result.returncode == 2, (stage, result.stderr)
        assert "Traceback" not in result.stderr, (stage, result.stderr)
        assert result.stderr.startswith(f"matting {stage}: error: {params}: 2 invalid key(s):"), result.stderr
        assert "composite.bogus: unknown key (typo?)" in result.stderr
        assert "evaluate.short_side: Input should be a valid integer" in result.stderr


def test_folders_without_a_seg_dir_name_the_key(tmp_path):
    params = _params(tmp_path, data={"source": "folders", "matte_dir": "m", "background_dir": "b", "seg_dir": None})
    result = _stage(tmp_path, "ingest", params)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "data.seg_dir is not set (null); point it at your dataset folder" in result.stderr


def test_a_cross_key_error_does_not_dump_the_params(tmp_path):
    params = _params(tmp_path, study={"seg": [1000]})
    result = _stage(tmp_path, "shard", params)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "methods.cell [240, 32] must be a cell of the grid" in result.stderr
    assert "'train'" not in result.stderr and len(result.stderr) < 400, result.stderr

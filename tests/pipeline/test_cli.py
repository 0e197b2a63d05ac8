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

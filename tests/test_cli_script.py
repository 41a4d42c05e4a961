"""The installed `wbc` script: every usage error, bad option value and unwritable output is one
line and exit 2, never a traceback (run in a subprocess, as a user runs it)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.test_cli import commands
from tests.wbc_script import one_line_error, run_wbc
from wbc import __version__

COMMANDS = [name for name, _ in commands()]


@pytest.mark.parametrize("name", COMMANDS)
def test_every_command_bad_usage_is_one_line(name):
    r = run_wbc(*name.split(), "--no-such-option")
    one_line_error(r, "No such option", f"wbc {name} --help")


def test_version_unknown_command_and_missing_argument():
    r = run_wbc("--version")
    assert r.returncode == 0 and r.stdout.strip() == f"wbc {__version__}", r
    one_line_error(run_wbc("bogus"), "No such command 'bogus'")
    one_line_error(run_wbc("predict"), "Missing argument", "wbc predict --help")
    one_line_error(run_wbc("train", "s.h5", "--epochs", "abc"), "--epochs")


def test_no_arguments_shows_help():
    for args in ((), ("cache",), ("ensemble",)):
        r = run_wbc(*args)
        assert r.returncode == 0 and "Usage" in r.stdout + r.stderr and "Traceback" not in r.stderr


# Refused by the configs' own checks (the same checks a Python caller gets), before any file is read.
BAD_OPTIONS = [
    (["train", "s.h5", "--epochs", "0"], "--epochs must be at least 1"),
    (["train", "s.h5", "--lr", "-1"], "--lr must be positive"),
    (["train", "s.h5", "--accum-steps", "0"], "--accum-steps must be at least 1"),
    (["train", "s.h5", "--crop", "-5"], "--crop must be at least 8"),
    (["train", "s.h5", "--crop", "0"], "--crop must be at least 8"),
    (["train", "s.h5", "--batch-size", "0"], "--batch-size must be at least 1"),
    (["prepare", "src", "--out", "s.h5", "--size", "0"], "--size must be at least 16"),
    (["prepare", "src", "--out", "s.h5", "--size", "-1"], "--size must be at least 16"),
    (["prepare", "src", "--out", "s.h5", "--max-template-candidates", "0"],
     "--max-template-candidates must be at least 1"),
    (["extract", "best.pt", "--store", "s.h5", "--out", "c.zarr", "--batch-size", "-1"], "--batch-size"),
    (["extract", "best.pt", "--store", "s.h5", "--out", "c.zarr", "--chunk-rows", "-8"], "--chunk-rows"),
    (["predict", "imgs", "--ensemble", "e.yaml", "--batch-size", "0"], "--batch-size must be at least 1"),
    (["predict", "imgs", "--ensemble", "e.yaml", "--batch-size", "-2"], "--batch-size must be at least 1"),
]


@pytest.mark.parametrize("argv,needle", BAD_OPTIONS, ids=lambda x: " ".join(x) if isinstance(x, list) else "")
def test_bad_option_value_is_refused_before_work(argv, needle, tmp_path):
    r = run_wbc(*argv, cwd=tmp_path)
    one_line_error(r, needle)
    assert sorted(os.listdir(tmp_path)) == []  # nothing was created


def test_configs_refuse_bad_values_for_python_callers():
    from wbc.engine.extract.run import ExtractConfig
    from wbc.engine.stage1.config import Stage1Config
    from wbc.errors import WbcError
    from wbc.prepare import PrepareConfig

    for make in (lambda: Stage1Config(lr=float("nan")), lambda: Stage1Config(crop=0),
                 lambda: PrepareConfig(size=-1), lambda: ExtractConfig(chunk_rows=-8)):
        with pytest.raises(WbcError):
            make()
    assert Stage1Config(crop=160).crop == 160 and ExtractConfig(batch_size=0).batch_size == 0


def _unwritable_dir(tmp_path: Path) -> Path:
    """A folder that refuses new files, also for root (who ignores permission bits)."""
    if os.geteuid() != 0:
        d = tmp_path / "ro"
        d.mkdir()
        d.chmod(0o555)
        return d
    if not Path("/sys").is_dir():
        pytest.skip("needs /sys (read-only for new files) when running as root")
    return Path("/sys")


def _outputs(tmp_path: Path, kind: str) -> Path:
    if kind == "below a file":
        (tmp_path / "afile").write_text("x")
        return tmp_path / "afile" / "out"
    if kind == "name too long":
        return tmp_path / ("n" * 300)
    return _unwritable_dir(tmp_path) / "wbc-out"


KINDS = ["below a file", "name too long", "read-only"]
CMDS = ["prepare", "extract", "train", "crt", "ablate", "evaluate", "ensemble save", "predict"]


@pytest.mark.parametrize("kind", KINDS)
def test_check_writable_refuses(kind, tmp_path):
    from wbc.errors import WbcError
    from wbc.fsutil import check_writable

    with pytest.raises(WbcError, match="cannot write"):
        check_writable(_outputs(tmp_path, kind))
    assert check_writable(tmp_path / "new" / "deeper" / "out.h5") and not (tmp_path / "new").exists()


@pytest.mark.parametrize("cmd", CMDS)
def test_unwritable_output_is_refused_before_work(cmd, tmp_path):
    """Each command, through the script, with one of the three kinds (all kinds are covered)."""
    kind = KINDS[CMDS.index(cmd) % len(KINDS)]
    out = _outputs(tmp_path, kind)
    argv = {
        "prepare": ["prepare", tmp_path, "--out", out],
        "extract": ["extract", tmp_path, "--store", tmp_path / "s.h5", "--out", out],
        "train": ["train", tmp_path / "s.h5", "--out", out],
        "crt": ["crt", tmp_path / "c.zarr", "--out", out],
        "ablate": ["ablate", tmp_path / "c.zarr", "--out", out],
        "evaluate": ["evaluate", "--model", f"m:{tmp_path}/c.zarr", "--folds", "0", "--out", out],
        "ensemble save": ["ensemble", "save", "--member", tmp_path / "b.pt", "--store", tmp_path / "s.h5",
                          "--out", out],
        "predict": ["predict", tmp_path, "--ensemble", tmp_path / "e.yaml", "--out", out],
    }[cmd]
    one_line_error(run_wbc(*argv), "cannot write")


@pytest.mark.parametrize("exc,code,needle", [
    (PermissionError(13, "Permission denied", "/data/in.csv"), 2, "error: /data/in.csv: Permission denied"),
    (IsADirectoryError(21, "Is a directory", "x.csv"), 2, "error: x.csv: Is a directory"),
    (KeyboardInterrupt(), 130, "interrupted: completed work is kept"),
])
def test_entry_point_os_errors_one_line_and_ctrl_c_130(exc, code, needle, monkeypatch, capsys):
    import wbc.prepare
    from tests.fixtures import cli_exit_code

    def boom(*a, **k):
        raise exc

    monkeypatch.setattr(wbc.prepare, "prepare_store", boom)
    assert cli_exit_code(["prepare", "src", "--out", "s.h5"]) == code
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def _help(*cmd: str) -> str:
    r = run_wbc(*cmd, "--help")
    assert r.returncode == 0, r
    return " ".join(r.stdout.split())  # rich may still break a long help line: compare words


def test_help_lists_every_registered_choice():
    """Choices in help text are the registries' (losses, samplers, degradations, augmentations,
    recipes): a newly registered one that the help does not name fails here."""
    from wbc.data import AUGMENTS
    from wbc.degrade import names as degradations
    from wbc.engine.stage1.lp_ft import RECIPES
    from wbc.losses import LOSSES
    from wbc.sampling import SAMPLERS

    for cmd in ("crt", "ablate"):
        text = _help(cmd)
        assert all(n in text for n in LOSSES.names()), (cmd, LOSSES.names())
        assert all(n in text for n in SAMPLERS.names()), (cmd, SAMPLERS.names())
    text = _help("robustness")
    assert all(n in text for n in degradations()), degradations()
    text = _help("train")
    assert all(n in text for n in [*AUGMENTS.names(), *RECIPES]), (AUGMENTS.names(), RECIPES)

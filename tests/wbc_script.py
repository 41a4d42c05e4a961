"""Run the installed `wbc` console script in a subprocess (what a user runs), this tree first."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WBC = Path(sys.executable).with_name("wbc")


def script_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    env["WBC_NO_PROGRESS"] = "1"
    env["COLUMNS"] = "400"  # rich wraps at the terminal width: one line must stay one line
    return env


def popen(*args: str, **kw) -> subprocess.Popen:
    return subprocess.Popen([str(WBC), *map(str, args)], env=script_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kw)


def run_wbc(*args: str, timeout: float = 300, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([str(WBC), *map(str, args)], env=script_env(), capture_output=True,
                          text=True, timeout=timeout, check=False, **kw)


def one_line_error(r: subprocess.CompletedProcess, *needles: str) -> str:
    """Assert exit 2, no traceback, exactly one `error:` line holding every needle; return it."""
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    assert "Traceback" not in r.stderr + r.stdout, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], r.stderr
    for n in needles:
        assert n in errors[0], (n, errors[0])
    return errors[0]

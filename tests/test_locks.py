"""One writer per output: a second `wbc prepare` / `wbc extract` on the same output (even with
--overwrite) is refused naming the running job's pid, and the first job's result is intact;
locks of dead processes are taken over; kill -9 of prepare leaves no worker running."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from tests.fixtures import make_tiny_store, tiny_checkpoint, write_image_folder
from tests.wbc_script import one_line_error, popen, run_wbc, script_env
from wbc.errors import WbcError
from wbc.fsutil import lock_path, output_lock

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="advisory locks are POSIX")


def _wait_for_lock(out: Path, pid: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    lp = lock_path(out)
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        try:
            if lp.read_text().strip() == str(pid):
                return
        except OSError:
            pass
        if proc.poll() is not None:
            raise AssertionError(f"the first job ended before taking its lock: {proc.communicate()}")
        time.sleep(0.002)
    raise AssertionError("the first job never took its lock")


def _holder(out: Path) -> subprocess.Popen:
    """Another process holding the lock of `out` until its stdin closes."""
    code = textwrap.dedent(f"""
        import sys
        from wbc.fsutil import output_lock
        with output_lock({str(out)!r}):
            print("held", flush=True)
            sys.stdin.read()
    """)
    p = subprocess.Popen([sys.executable, "-c", code], env=script_env(), stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "held"
    return p


def test_second_process_refused_with_holder_pid_then_stale_lock_taken_over(tmp_path):
    out = tmp_path / "x.zarr"
    p = _holder(out)
    with pytest.raises(WbcError, match=f"pid {p.pid}"), output_lock(out):
        pass
    p.kill()  # dies holding the lock: the kernel releases it, the file (with its pid) stays
    p.wait()
    assert lock_path(out).read_text().strip() == str(p.pid)
    with output_lock(out):
        assert lock_path(out).read_text().strip() == str(os.getpid())
        with output_lock(out):  # re-entrant in one process (robustness -> extract)
            pass
        assert lock_path(out).exists()
    assert not lock_path(out).exists()


def test_prepare_race_second_writer_refused_first_intact(tmp_path):
    a = write_image_folder(tmp_path / "a", classes=("A", "B"), n_per_class=6, size=64, seed=0)
    b = write_image_folder(tmp_path / "b", classes=("X", "Y", "Z"), n_per_class=3, size=64, seed=1)
    out = tmp_path / "s.h5"
    first = popen("prepare", a, "--out", out, "--workers", "0", "--size", "32")
    try:
        _wait_for_lock(out, first.pid, first)
        first.send_signal(signal.SIGSTOP)  # keep it mid-run, holding the lock
        r = run_wbc("prepare", b, "--out", out, "--overwrite", "--workers", "0", "--size", "32")
        line = one_line_error(r, f"pid {first.pid}")
        assert "rerun with --overwrite" not in line
    finally:
        first.send_signal(signal.SIGCONT)
    _, err = first.communicate(timeout=600)
    assert first.returncode == 0, err
    from wbc.store import open_store

    s = open_store(out)
    assert s.class_names == ["A", "B"] and len(s) == 12
    assert sorted(s.paths) == sorted(p.relative_to(a).as_posix() for p in a.rglob("*.png"))
    assert not lock_path(out).exists()


def test_extract_race_second_writer_refused_first_intact(tmp_path):
    from wbc.cache import open_cache
    from wbc.engine.extract.config import ExtractConfig
    from wbc.engine.extract.run import extract
    from wbc.store import open_store

    store = make_tiny_store(tmp_path / "s.h5", n_per_class=6, size=40)
    st = open_store(store)
    ck_a = tiny_checkpoint(tmp_path / "a" / "best.pt", st, crop=32, resize=40, seed=0)
    ck_b = tiny_checkpoint(tmp_path / "b" / "best.pt", st, crop=32, resize=40, seed=1)
    out = tmp_path / "c.zarr"
    opts = ("--store", store, "--device", "cpu", "--workers", "0", "--batch-size", "4", "--chunk-rows", "4")
    first = popen("extract", ck_a, "--out", out, *opts)
    try:
        _wait_for_lock(out, first.pid, first)
        first.send_signal(signal.SIGSTOP)
        one_line_error(run_wbc("extract", ck_b, "--out", out, "--overwrite", *opts), f"pid {first.pid}")
    finally:
        first.send_signal(signal.SIGCONT)
    _, err = first.communicate(timeout=600)
    assert first.returncode == 0, err
    got = open_cache(out, checkpoint=ck_a, store=store)  # complete, and A's
    ref = tmp_path / "ref.zarr"
    extract(ck_a, store, ref, ExtractConfig(device="cpu", workers=0, batch_size=4, chunk_rows=4))
    np.testing.assert_array_equal(got.features[:], open_cache(ref).features[:])


def _children(pid: int) -> list[int]:
    kids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                stat = (d / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                kids.append(int(d.name))
    return kids


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"  # a zombie has exited (PID 1 of a container may not reap it)


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc")
@pytest.mark.parametrize("backend", ["torchstain", "batched"])  # spawned / forked worker processes
def test_kill_9_of_prepare_leaves_no_worker_running(tmp_path, backend):
    n = 30 if backend == "torchstain" else 300  # the forked numpy workers are fast: give them work
    src = write_image_folder(tmp_path / "src", classes=("A", "B"), n_per_class=n, size=96)
    out = tmp_path / "s.h5"
    p = popen("prepare", src, "--out", out, "--workers", "2", "--stain-backend", backend, "--device", "cpu")
    try:
        t0 = time.monotonic()
        while len(kids := [k for k in _children(p.pid) if _alive(k)]) < 2:
            assert p.poll() is None and time.monotonic() - t0 < 300, "workers never started"
            time.sleep(0.05)
        time.sleep(1.0)
    finally:
        p.kill()
        p.wait()
    t0 = time.monotonic()
    # A worker still importing torch when its parent died exits once it starts (under load: long).
    while (left := [k for k in kids if _alive(k)]) and time.monotonic() - t0 < 240:
        time.sleep(0.2)
    for k in left:  # do not leave them behind even when the test fails
        os.kill(k, signal.SIGKILL)
    assert not left, f"orphaned worker processes still running: {left}"


def test_train_crt_predict_refuse_an_output_another_process_holds(tmp_path):
    from tests.fixtures import cli_exit_code
    from wbc.engine.evaluate.predict import predict
    from wbc.engine.stage1.config import Stage1Config
    from wbc.engine.stage1.train import train

    store = make_tiny_store(tmp_path / "s.h5", n_per_class=4, size=40)
    holders = [_holder(tmp_path / "run" / "fold0"), _holder(tmp_path / "crt"), _holder(tmp_path / "p.csv")]
    try:
        cfg = Stage1Config(backbone="test_resnet", pretrained="none", epochs=1, batch_size=4, crop=32,
                          workers=0, device="cpu")
        with pytest.raises(WbcError, match=f"pid {holders[0].pid}"):
            train(store, tmp_path / "run", cfg, fold=0, overwrite=True)
        assert not (tmp_path / "run" / "fold0").exists()
        assert cli_exit_code(["crt", str(tmp_path / "c.zarr"), "--out", str(tmp_path / "crt")]) == 2
        with pytest.raises(WbcError, match=f"pid {holders[2].pid}"):
            predict(tmp_path, tmp_path / "e.yaml", tmp_path / "p.csv")
    finally:
        for h in holders:
            h.stdin.close()
            h.wait()


def test_hdf5_lock_message_does_not_advise_overwrite(tmp_path):
    """A store held open for writing by some other program: wait, not --overwrite."""
    from wbc.store import StoreWriter

    out = tmp_path / "s.h5"
    StoreWriter(out, size=8, plan_id="p").close()  # a partial store
    code = (f"import h5py, sys\nf = h5py.File({str(out)!r}, 'a')\nprint('open', flush=True)\n"
            "sys.stdin.read()\n")
    p = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "open"
        with pytest.raises(WbcError) as e:
            StoreWriter(out, size=8, plan_id="p")
        assert "another process" in str(e.value) and "--overwrite" not in str(e.value)
    finally:
        p.stdin.close()
        p.wait()

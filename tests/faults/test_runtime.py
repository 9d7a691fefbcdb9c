"""The fault catalogue, part 3: faults while the engine runs (engine side).

=========================  ===================================================================
case                       what the user sees
=========================  ===================================================================
out of memory (CPU)        exit 2, error OutOfMemory: "out of memory while predicting IMAGE
                           with --batch-size 64 (batches of 4 tiles here): try --batch-size 2"
                           (half the batch that failed); nothing at the output
out of memory (GPU)        exit 2, error OutOfMemory: "out of GPU memory while predicting IMAGE
                           with --batch-size 4: try --batch-size 2" (hint: or --device cpu)
disk full                  exit 2, error DiskFull: "no space left on the disk of FOLDER
                           (writing OUT): free space or choose another output; nothing was
                           written"; no output, no partial file
SIGKILL mid-train          no folder at --out (the model is written in a hidden
                           ``.NAME.PID-….partial`` folder, renamed at the end); the next train
                           on that output removes it and says so on stderr ("removed … left by
                           an interrupted job (PID …)", "took over the lock …"), and removes
                           the killed training's work folder (checkpoints) in the temp folder
SIGKILL mid-predict        no output; the next predict on that output removes the hidden
                           ``.STEM.PID-….partial…`` files (and a multi-process predict's
                           ``.NAME.geopeft-….parts`` folder) and says so
cancel (SIGTERM)           honoured before the next batch: done(cancelled), exit 0, within a
                           few seconds, far below the plugin's grace period (30 s) before kill
second SIGTERM             stops at once, even inside a long batch: done(ok false, cancelled),
                           exit 0, nothing at the output, no partial file, no lock
two jobs, one output       the second refuses at once, exit 2, error OutputBusy: "another
                           GeoPEFT job (predict, PID N) is writing OUT" (hint: wait, cancel it
                           or choose another output)
the parent is gone         the engine notices within about a second (watchdog thread: parent
                           PID changed), cancels: done(cancelled), nothing at the output
output folder removed      exit 2, error OutputFolderGone: "the output folder F was removed
                           while writing OUT: nothing was written"
=========================  ===================================================================

Some faults are provoked inside a real engine process through a small patch applied before
``engine.cli.main`` runs (a slow or failing model runner, a disk that fills up): a real
out-of-memory would threaten the shared test machine.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from engine.reliability import pid_alive
from tests.conftest import ENGINE_ENV, REPO, TINY, run_engine

try:
    from qgis_plugin.core.engine_client import CANCEL_GRACE_S
except Exception:  # noqa: BLE001 - the plugin's package may need QGIS; the value it documents
    CANCEL_GRACE_S = 30.0

# A patch run inside the engine before main(): the model runner waits DELAY s before each batch
# (after writing MARK, so a test knows tiles are being predicted), or raises RAISE.
RUNNER_PATCH = """
import time, pathlib
import engine.inference.predict as _p
_load = _p.load_runner
def load_runner(*a, **k):
    runner = _load(*a, **k)
    call = type(runner).__call__
    class Patched(type(runner)):
        def __call__(self, x):
            pathlib.Path({mark!r}).write_text("batch")
            {raise_}
            time.sleep({delay})
            return call(self, x)
    runner.__class__ = Patched
    return runner
_p.load_runner = load_runner
"""


def engine_cmd(*args, patch: str = "") -> list[str]:
    """The command line of ``python -m engine ARGS --events jsonl`` with ``patch`` applied first."""
    code = f"{patch}\nimport sys\nfrom engine.cli import main\nsys.exit(main(sys.argv[1:]))\n"
    return [sys.executable, "-c", code, *[str(a) for a in args], "--events", "jsonl"]


def runner_patch(mark: Path, delay: float = 0.0, raise_: str = "pass") -> str:
    return RUNNER_PATCH.format(mark=str(mark), delay=delay, raise_=raise_)


def start(cmd, **kw) -> subprocess.Popen:
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
                            env=ENGINE_ENV, **kw)


def finish(proc: subprocess.Popen, timeout: float = 120) -> dict:
    out, err = proc.communicate(timeout=timeout)
    events = [json.loads(line) for line in out.splitlines() if line.strip().startswith("{")]
    done = next((e for e in events if e["event"] == "done"), {})
    return {**done, "_events": events, "_stderr": err, "_rc": proc.returncode}


def run_patched(*args, patch: str, timeout: float = 120) -> dict:
    return finish(start(engine_cmd(*args, patch=patch)), timeout)


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            log = proc.stderr.read()[-3000:] if proc.stderr else ""
            raise AssertionError(f"ended early ({proc.returncode}):\n{log}")
        assert time.monotonic() < deadline, "engine never reached the point"
        time.sleep(0.05)


def error_of(result: dict) -> dict:
    return next(e for e in result["_events"] if e["event"] == "error")


def leftovers(folder: Path) -> list[str]:
    """Hidden files of the engine in ``folder``: partial outputs and locks."""
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".") and
                  ("partial" in p.name or "geopeft" in p.name))


def assert_nothing_written(folder: Path, *outputs: Path) -> None:
    for path in outputs:
        assert not path.exists(), f"{path} was written"
    assert not folder.exists() or not leftovers(folder), leftovers(folder)


@pytest.fixture
def predict_args(tiny_model, small_scene, tmp_path):
    out = tmp_path / "out" / "classes.tif"
    return out, ["predict", "--model", tiny_model, "--image", small_scene.image, "--out", out, "--device", "cpu"]


# -- 1. out of memory ----------------------------------------------------------------------------
def test_out_of_memory_on_cpu_says_which_batch_size_to_try(predict_args, tmp_path):
    out, args = predict_args
    result = run_patched(*args, "--batch-size", "64", "--probabilities", out.with_name("p.tif"),
                         patch=runner_patch(tmp_path / "mark", raise_='raise MemoryError('
                                            '"Unable to allocate 9.16 GiB for an array with shape (64, 6, 224, 224)")'))
    error = error_of(result)
    assert result["_rc"] == 2 and result["ok"] is False
    assert error["error_type"] == "OutOfMemory"
    # a 96 px raster has 4 tiles a strip: the batch that failed held 4, so half of that is advised
    assert "out of memory" in error["message"]
    assert "with --batch-size 64 (batches of 4 tiles here): try --batch-size 2" in error["message"]
    assert Path(args[4]).name in error["message"]  # the image
    assert "Traceback" not in result["_stderr"]
    assert_nothing_written(out.parent, out, out.with_name("p.tif"))


def test_out_of_gpu_memory_is_caught_the_same_way(predict_args, tmp_path):
    out, args = predict_args
    result = run_patched(*args, "--batch-size", "4", patch=runner_patch(
        tmp_path / "mark", raise_='import torch; raise torch.cuda.OutOfMemoryError('
        '"CUDA out of memory. Tried to allocate 20.00 GiB (GPU 0; 79.10 GiB total capacity)")'))
    error = error_of(result)
    assert result["_rc"] == 2 and error["error_type"] == "OutOfMemory"
    assert "out of GPU memory" in error["message"] and "with --batch-size 4: try --batch-size 2" in error["message"]
    assert "--device cpu" in error["hint"]
    assert_nothing_written(out.parent, out)


# A real allocation failure, without threatening the machine: at the first batch the engine's
# address space is capped at what it uses plus HEADROOM bytes, so a large batch cannot be allocated.
RLIMIT_PATCH = """
import resource
import engine.inference.predict as _p
_load = _p.load_runner
def load_runner(*a, **k):
    runner = _load(*a, **k)
    call = type(runner).__call__
    class Limited(type(runner)):
        def __call__(self, x):
            if not getattr(self, "_limited", False):
                self._limited = True
                call(self, x[:1])  # thread pools started before the cap
                with open("/proc/self/status") as f:
                    size = int(next(l for l in f if l.startswith("VmSize")).split()[1]) * 1024
                resource.setrlimit(resource.RLIMIT_AS, (size + {headroom}, resource.getrlimit(resource.RLIMIT_AS)[1]))
            return call(self, x)
    runner.__class__ = Limited
    return runner
_p.load_runner = load_runner
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RLIMIT_AS and /proc: Linux")
def test_a_real_allocation_failure_says_which_batch_size_to_try(tiny_model, tmp_path):
    import numpy as np
    import rasterio
    from affine import Affine

    image = tmp_path / "wide.tif"  # 800 tiles in one row: one batch of 100000 takes them all
    data = np.random.default_rng(0).integers(1, 3000, (6, 32, 19200)).astype(np.uint16)
    with rasterio.open(image, "w", driver="GTiff", width=19200, height=32, count=6, dtype="uint16", nodata=0,
                       crs="EPSG:32633", transform=Affine(10, 0, 500000, 0, -10, 5000000)) as dst:
        dst.write(data)
    out = tmp_path / "out" / "classes.tif"
    result = run_patched("predict", "--model", tiny_model, "--image", image, "--out", out, "--device", "cpu",
                         "--precision", "32", "--batch-size", "100000", patch=RLIMIT_PATCH.format(headroom=64 * 2**20))
    error = error_of(result)
    assert result["_rc"] == 2 and error["error_type"] == "OutOfMemory", result["_stderr"][-3000:]
    assert "out of memory while predicting wide.tif with --batch-size 100000" in error["message"]
    ran = int(re.search(r"batches of (\d+) tiles here", error["message"]).group(1))  # a strip's tiles
    assert 1 < ran < 1000 and f"try --batch-size {ran // 2}" in error["message"]
    assert_nothing_written(out.parent, out)


# -- 2. disk full -------------------------------------------------------------------------------
DISK_FULL_PATCH = """
import errno, os, pathlib
import engine.inference.predict as _p
_to_cog = _p.to_cog
def to_cog(src, dst, resampling):
    pathlib.Path(dst).write_bytes(b"II*" + bytes(4096))  # half a file, then the disk is full
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(dst))
_p.to_cog = to_cog
"""


def test_disk_full_while_writing_leaves_nothing_and_says_what_to_do(predict_args):
    out, args = predict_args
    result = run_patched(*args, "--uncertainty", out.with_name("u.tif"), patch=DISK_FULL_PATCH)
    error = error_of(result)
    assert result["_rc"] == 2 and error["error_type"] == "DiskFull"
    assert "no space left" in error["message"] and str(out) in error["message"]
    assert "free space or choose another output" in error["message"]
    assert_nothing_written(out.parent, out, out.with_name("u.tif"), out.with_suffix(".qml"))


@pytest.fixture
def small_disk(tmp_path):
    """A 1 MiB tmpfs (root only), nearly filled; skipped where it cannot be mounted."""
    mount = tmp_path / "small-disk"
    mount.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "geopeft-test", str(mount)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def test_a_real_full_disk_leaves_nothing(small_disk, tiny_model, small_scene):
    filler = small_disk / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT)  # fill it, then free 16 KiB: the lock fits, the rasters do not
    try:
        while True:
            os.write(fd, bytes(4096))
    except OSError:
        pass
    finally:
        os.close(fd)
    os.truncate(filler, filler.stat().st_size - 16384)
    out = small_disk / "classes.tif"
    result = run_engine("predict", "--model", tiny_model, "--image", small_scene.image, "--out", out,
                        "--probabilities", small_disk / "p.tif", "--device", "cpu", expect_ok=False)
    error = error_of(result)
    assert result["_rc"] == 2 and error["error_type"] == "DiskFull", result["_stderr"][-2000:]
    assert "no space left" in error["message"] and str(small_disk) in error["message"]
    assert sorted(p.name for p in small_disk.iterdir()) == ["filler"]


# -- 3. and 4. killed jobs ----------------------------------------------------------------------------
def test_sigkill_while_the_model_is_written_leaves_no_model_and_the_next_train_cleans_up(small_scene, tmp_path):
    out = tmp_path / "model"
    mark = tmp_path / "mark"
    patch = textwrap.dedent(f"""
        import pathlib, time
        import engine.training.train as _t
        def write_card(card, folder):  # the weights are written: stop before the card
            pathlib.Path({str(mark)!r}).write_text(str(folder))
            time.sleep(600)
        _t.write_card = write_card
    """)
    train = ["train", "--image", small_scene.image, "--labels", small_scene.labels, *TINY, "--out", out]
    proc = start(engine_cmd(*train, patch=patch))
    try:
        wait_for(mark, proc, timeout=300)
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()
    assert not out.exists()  # nothing that looks like a model
    partial = Path(mark.read_text())
    assert partial.parent == tmp_path and partial.name.startswith(f".model.{proc.pid}-")
    assert (partial / "adapter.safetensors").exists() and not (partial / "card.json").exists()
    assert (tmp_path / ".model.geopeft-lock").exists()  # the kernel released it; the file stays

    again = run_engine(*train)
    assert (out / "card.json").exists()
    assert leftovers(tmp_path) == []
    assert f"removed 1 temporary file(s) beside {out}" in again["_stderr"] and f"PID {proc.pid}" in again["_stderr"]
    assert "took over the lock" in again["_stderr"]


def test_sigkill_mid_training_leaves_no_model_and_the_next_train_removes_its_work_folder(small_scene, tmp_path):
    import tempfile

    out = tmp_path / "model"
    train = ["train", "--image", small_scene.image, "--labels", small_scene.labels, *TINY, "--epochs", "50",
             "--out", out]
    proc = subprocess.Popen([sys.executable, "-m", "engine", *map(str, train), "--events", "jsonl"],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=REPO, env=ENGINE_ENV)
    try:
        for line in proc.stdout:  # wait until it trains
            event = json.loads(line)
            if event["event"] == "progress" and event["stage"] == "train":
                break
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert event["event"] == "progress" and event["stage"] == "train"
    assert not out.exists()
    work = list(Path(tempfile.gettempdir()).glob(f"geopeft-train-{proc.pid}-*"))
    assert work  # its resumable checkpoints' folder

    again = run_engine(*train[:-2], "--epochs", "1", "--out", out)
    assert (out / "card.json").exists() and not any(w.exists() for w in work)
    assert "work folder(s) of interrupted trainings" in again["_stderr"]
    assert "took over the lock" in again["_stderr"]


def test_sigkill_mid_predict_leaves_partials_that_the_next_predict_removes(predict_args, tmp_path):
    out, args = predict_args
    probs = out.with_name("p.tif")
    proc = start(engine_cmd(*args, "--probabilities", probs, "--batch-size", "1",
                            patch=runner_patch(tmp_path / "mark", delay=0.2)))
    try:
        wait_for(tmp_path / "mark", proc)
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()
    assert not out.exists() and not probs.exists()
    left = leftovers(out.parent)
    assert any(name.startswith(f".classes.{proc.pid}-") and ".partial" in name for name in left), left
    assert ".classes.tif.geopeft-lock" in left
    parts = out.parent / ".classes.tif.geopeft-k1ll3d.parts"  # as a killed predict --devices 2 leaves
    parts.mkdir()
    (parts / "rank0.tif").write_bytes(b"II*")

    again = run_engine(*args, "--probabilities", probs)
    assert out.exists() and probs.exists()
    assert leftovers(out.parent) == []
    assert "left by an interrupted job" in again["_stderr"] and f"PID {proc.pid}" in again["_stderr"]


# -- 5. and 6. cancel ---------------------------------------------------------------------------
def test_cancel_is_honoured_per_batch_far_below_the_plugins_grace_period(predict_args, tmp_path):
    out, args = predict_args
    proc = start(engine_cmd(*args, "--batch-size", "1", patch=runner_patch(tmp_path / "mark", delay=0.5)))
    try:
        wait_for(tmp_path / "mark", proc)
        time.sleep(0.3)  # inside a batch
        sent = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        result = finish(proc, timeout=CANCEL_GRACE_S)
        took = time.monotonic() - sent
    finally:
        if proc.poll() is None:
            proc.kill()
    assert result["_rc"] == 0 and result["cancelled"] is True and result["out"] is None
    assert took < min(5.0, CANCEL_GRACE_S / 4), f"{took:.1f} s from SIGTERM to exit"
    assert_nothing_written(out.parent, out)


def test_a_second_sigterm_stops_at_once_even_inside_a_long_batch(predict_args, tmp_path):
    out, args = predict_args
    proc = start(engine_cmd(*args, "--probabilities", out.with_name("p.tif"),
                            patch=runner_patch(tmp_path / "mark", delay=300)))
    try:
        wait_for(tmp_path / "mark", proc)
        proc.send_signal(signal.SIGTERM)  # honoured after the batch: in 300 s
        time.sleep(0.5)
        assert proc.poll() is None
        sent = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        result = finish(proc, timeout=30)
        took = time.monotonic() - sent
    finally:
        if proc.poll() is None:
            proc.kill()
    assert took < 5, f"{took:.1f} s from the second SIGTERM to exit"
    assert result["_rc"] == 0 and result["ok"] is False and result["cancelled"] is True
    assert "Traceback" not in result["_stderr"]
    assert_nothing_written(out.parent, out, out.with_name("p.tif"))


# -- 7. two jobs, one output ---------------------------------------------------------------------------
def test_a_second_job_on_the_same_output_refuses_at_once_naming_the_first(predict_args, tmp_path):
    out, args = predict_args
    first = start(engine_cmd(*args, "--batch-size", "1", patch=runner_patch(tmp_path / "mark", delay=1.0)))
    try:
        wait_for(tmp_path / "mark", first)
        started = time.monotonic()
        second = run_engine(*args, expect_ok=False)
        took = time.monotonic() - started
        assert first.poll() is None
        first.send_signal(signal.SIGTERM)
        first_result = finish(first, timeout=60)
    finally:
        if first.poll() is None:
            first.kill()
    error = error_of(second)
    assert second["_rc"] == 2 and error["error_type"] == "OutputBusy"
    assert str(out) in error["message"] and f"PID {first.pid})" in error["message"]
    assert "choose another output" in error["hint"]
    assert not [e for e in second["_events"] if e["event"] == "progress"]  # refused before any work
    assert took < 30
    assert first_result["cancelled"] is True  # the first job was not disturbed
    assert_nothing_written(out.parent, out)


# -- 8. the parent is gone -----------------------------------------------------------------------------
@pytest.mark.skipif(sys.platform == "win32", reason="POSIX parent watchdog")
def test_the_engine_cancels_when_the_process_that_started_it_dies(predict_args, tmp_path):
    out, args = predict_args
    events, log = tmp_path / "events.jsonl", tmp_path / "engine.log"
    cmd = engine_cmd(*args, "--batch-size", "1", patch=runner_patch(tmp_path / "mark", delay=1.0))
    launcher = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import subprocess, sys, time
        p = subprocess.Popen({cmd!r}, stdout=open({str(events)!r}, "w"), stderr=open({str(log)!r}, "w"),
                             cwd={str(REPO)!r})
        print(p.pid, flush=True)
        p.wait()
    """)], stdout=subprocess.PIPE, text=True, env=ENGINE_ENV)
    pid = None
    try:
        pid = int(launcher.stdout.readline())
        wait_for(tmp_path / "mark", launcher)
        launcher.send_signal(signal.SIGKILL)  # QGIS crashes
        launcher.wait(30)
        gone = time.monotonic()
        while pid_alive(pid) and time.monotonic() - gone < 30:
            time.sleep(0.1)
        took = time.monotonic() - gone
    finally:
        if launcher.poll() is None:
            launcher.kill()
        if pid and pid_alive(pid):
            os.kill(pid, signal.SIGKILL)
    assert took < 10, f"the engine ran on {took:.1f} s after its parent died"
    done = [json.loads(line) for line in events.read_text().splitlines() if '"done"' in line]
    assert done and done[-1]["cancelled"] is True, log.read_text()[-3000:]
    assert "is gone: cancelling" in log.read_text()
    assert_nothing_written(out.parent, out)


# -- 9. the output's folder removed mid-run ----------------------------------------------------------
def test_the_output_folder_removed_mid_run_is_explained(predict_args, tmp_path):
    out, args = predict_args
    mark = tmp_path / "mark"
    proc = start(engine_cmd(*args, "--batch-size", "1", patch=runner_patch(mark, delay=0.2)))
    try:
        wait_for(mark, proc)
        import shutil
        shutil.rmtree(out.parent)
        result = finish(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
    error = error_of(result)
    assert result["_rc"] == 2 and error["error_type"] == "OutputFolderGone", result["_stderr"][-2000:]
    assert str(out.parent) in error["message"] and "removed" in error["message"]
    assert not out.parent.exists()

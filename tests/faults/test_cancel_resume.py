"""Cancel and resume training (issue 9): a cancel in training or validation stops within one
batch and keeps a resumable checkpoint beside the best model so far; ``train --resume DIR``
continues to the same weights as a run never interrupted; the messages say what happened."""
from __future__ import annotations

import json
import signal
import subprocess
import sys

import pytest

from tests.conftest import ENGINE_ENV, REPO

CANCEL_AT = "GEOPEFT_TEST_CANCEL_AT"  # engine.training.task.CANCEL_AT_ENV
# 4 epochs of 2 steps of a tiny random-weight model, in float32 (no bf16 rounding) on the CPU.
RUN = ["--weights", "none", "--chip-size", "32", "--batch-size", "4", "--chips-per-epoch", "8",
       "--precision", "32", "--device", "cpu", "--epochs", "4", "--seed", "3"]


def engine(*args, cancel_at: str | None = None) -> dict:
    """``python -m engine ARGS --events jsonl``: the done event, plus events, stderr and exit status."""
    env = {k: v for k, v in ENGINE_ENV.items() if k != CANCEL_AT}
    if cancel_at:
        env[CANCEL_AT] = cancel_at
    proc = subprocess.run([sys.executable, "-m", "engine", *map(str, args), "--events", "jsonl"],
                          capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
    events = [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]
    done = next((e for e in events if e["event"] == "done"), {})
    return {**done, "_events": events, "_stderr": proc.stderr, "_rc": proc.returncode}


def warnings_of(done: dict) -> str:
    return "\n".join(e["message"] for e in done["_events"] if e["event"] == "warning")


def metric_epochs(done: dict, name: str = "val_miou") -> list[int]:
    return [e["epoch"] for e in done["_events"] if e["event"] == "metric" and e["name"] == name]


def train_epochs(done: dict) -> list[int]:
    return sorted({e["epoch"] for e in done["_events"] if e["event"] == "progress" and e["stage"] == "train"})


def tensors(folder) -> dict:
    from safetensors.torch import load_file
    return load_file(str(folder / "adapter.safetensors"))


@pytest.fixture(scope="module")
def data(small_scene):
    return ["--image", small_scene.image, "--labels", small_scene.labels]


@pytest.fixture(scope="module")
def uninterrupted(data, tmp_path_factory):
    """Run A: never stopped. Its cancel comes once the model is written (too late to stop anything)."""
    out = tmp_path_factory.mktemp("a") / "model"
    return out, engine("train", *data, *RUN, "--out", out, cancel_at="written")


@pytest.fixture(scope="module")
def cancelled(data, tmp_path_factory):
    """Run B: cancelled after its fifth step, the first of epoch 3 (epochs 1 and 2 done)."""
    out = tmp_path_factory.mktemp("b") / "model"
    return out, engine("train", *data, *RUN, "--out", out, cancel_at="step:5")


def test_cancel_mid_training_keeps_the_best_model_and_a_resumable_checkpoint(cancelled):
    out, done = cancelled
    assert done["_rc"] == 0 and done["cancelled"] is True and done["resumable"] is True, done["_stderr"][-2000:]
    steps = [e["step"] for e in done["_events"] if e["event"] == "progress" and e["stage"] == "train"]
    assert max(steps) == 5 and train_epochs(done) == [1, 2, 3]  # stopped within the batch
    assert sorted(p.name for p in out.iterdir()) == ["adapter.safetensors", "card.json", "resume.ckpt",
                                                      "resume.json"]
    card = json.loads((out / "card.json").read_text())["training"]
    assert card["cancelled"] is True and card["cancelled_in_epoch"] == 3 and card["epochs"] == 2
    assert card["resume"]["epochs_done"] == 2 and card["resume"]["epochs"] == 4
    assert card["resume"]["command"] == f"python -m engine train --resume {out.resolve()}"
    info = json.loads((out / "resume.json").read_text())
    assert info["config"]["seed"] == 3 and info["config"]["epochs"] == 4 and info["step"] == 4
    message = warnings_of(done)
    assert "cancelled in epoch 3 of 4" in message and "the first 2 epochs are saved" in message
    assert f"--resume {out.resolve()}" in message
    import torch
    ckpt = torch.load(out / "resume.ckpt", map_location="cpu", weights_only=True)
    assert {"state_dict", "optimizer_states", "lr_schedulers", "loops", "callbacks", "geopeft_rng"} <= set(ckpt)
    assert ckpt["epoch"] == 2 and ckpt["global_step"] == 4
    assert set(ckpt["geopeft_rng"]) >= {"python", "numpy", "torch"}
    assert any(state.get("best_state") for state in ckpt["callbacks"].values())  # KeepBest


def _same(a, b, path="checkpoint"):
    """Nested checkpoint contents equal (tensors and floats within 1e-5)."""
    import torch
    if isinstance(a, dict):
        assert a.keys() == b.keys(), (path, set(a) ^ set(b))
        for k in a:
            _same(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _same(x, y, f"{path}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert a.shape == b.shape and (a.double() - b.double()).abs().max().item() <= 1e-5, path
    elif isinstance(a, float):
        assert a == pytest.approx(b, abs=1e-5), path
    else:
        assert a == b, path


def test_a_resumed_run_holds_the_same_training_state_as_one_never_stopped(cancelled, data, tmp_path):
    """Cancelled again in epoch 4 after resuming, its checkpoint (weights, optimiser, schedule
    (the plateau counter too), best epoch, random states) equals that of a run cancelled there at once."""
    import shutil

    import torch
    b_out, _ = cancelled
    again = tmp_path / "again"
    shutil.copytree(b_out, again)
    resumed = engine("train", "--resume", again, cancel_at="step:7")
    assert resumed["_rc"] == 0 and resumed["cancelled"] and resumed["resumable"], resumed["_stderr"][-2000:]
    once = engine("train", *data, *RUN, "--out", tmp_path / "once", cancel_at="step:7")
    assert once["resumable"], once["_stderr"][-2000:]
    x, y = (torch.load(f / "resume.ckpt", map_location="cpu", weights_only=True) for f in (again, tmp_path / "once"))
    assert x["epoch"] == y["epoch"] == 3 and x["global_step"] == y["global_step"] == 6
    for key in ("state_dict", "optimizer_states", "lr_schedulers", "callbacks", "geopeft_rng"):
        _same(x[key], y[key], key)


def test_resume_reaches_the_uninterrupted_weights(uninterrupted, cancelled, data):
    a_out, a_done = uninterrupted
    b_out, _ = cancelled
    assert a_done["_rc"] == 0 and a_done["ok"], a_done["_stderr"][-2000:]
    # other arguments than the run's are refused, each named; the folder stays as it was
    refused = engine("train", "--resume", b_out, "--epochs", "9", "--lr", "0.5", *data[:2])
    assert refused["_rc"] == 2 and (b_out / "resume.ckpt").exists()
    error = next(e for e in refused["_events"] if e["event"] == "error")
    assert "--epochs 9 (the run was started with 4)" in error["message"] and "--lr 0.5" in error["message"]
    assert "--image" not in error["message"]  # the same image, repeated: no conflict
    resumed = engine("train", "--resume", b_out, "--device", "cpu")
    assert resumed["_rc"] == 0 and resumed["ok"] and not resumed["cancelled"], resumed["_stderr"][-3000:]
    assert train_epochs(resumed) == [3, 4] and metric_epochs(resumed) == [3, 4]
    assert sorted(p.name for p in b_out.iterdir()) == ["adapter.safetensors", "card.json"]  # resume files gone
    a, b = tensors(a_out), tensors(b_out)
    assert a.keys() == b.keys()
    worst = max((a[k].double() - b[k].double()).abs().max().item() for k in a)
    assert worst <= 1e-5, worst
    card_a = json.loads((a_out / "card.json").read_text())["training"]
    card_b = json.loads((b_out / "card.json").read_text())["training"]
    assert card_b["best_val_miou"] == pytest.approx(card_a["best_val_miou"], abs=1e-5)
    assert (card_b["best_epoch"], card_b["epochs"], card_b["steps"]) == (card_a["best_epoch"], 4, 8)
    assert card_b["cancelled"] is False and card_b["resumed_after_epoch"] == 2


def test_a_cancel_after_the_model_was_written_says_it_is_complete(uninterrupted):
    out, done = uninterrupted
    assert done["cancelled"] is False and done["finished_before_cancel"] is True
    assert "finished before the cancel arrived: the model is complete" in warnings_of(done)
    assert "cancelled in" not in warnings_of(done)
    assert sorted(p.name for p in out.iterdir()) == ["adapter.safetensors", "card.json"]
    assert json.loads((out / "card.json").read_text())["training"]["cancelled"] is False


def test_resume_without_a_checkpoint_is_refused(uninterrupted, tmp_path):
    out, _ = uninterrupted
    done = engine("train", "--resume", out)
    error = next(e for e in done["_events"] if e["event"] == "error")
    assert done["_rc"] == 2 and str(out) in error["message"] and "nothing to resume" in error["message"]
    assert "model is complete" in error["hint"]
    missing = engine("train", "--resume", tmp_path / "nowhere")
    error = next(e for e in missing["_events"] if e["event"] == "error")
    assert missing["_rc"] == 2 and str(tmp_path / "nowhere") in error["message"] and error["hint"]
    assert not (tmp_path / "nowhere").exists()


def test_cancel_mid_validation_stops_within_a_batch(data, tmp_path):
    out = tmp_path / "model"
    done = engine("train", *data, *RUN, "--batch-size", "2", "--out", out, cancel_at="validate:2:0")
    assert done["_rc"] == 0 and done["cancelled"] is True, done["_stderr"][-2000:]
    assert metric_epochs(done) == [1] and train_epochs(done) == [1, 2]  # epoch 2's validation never ended
    card = json.loads((out / "card.json").read_text())["training"]
    assert card["best_epoch"] == 1 and card["cancelled_in_epoch"] == 2 and card["resume"]["epochs_done"] == 1
    assert "cancelled in epoch 2 of 4" in warnings_of(done) and (out / "resume.ckpt").exists()


def test_cancel_before_the_first_epoch_ends_keeps_nothing(data, tmp_path):
    out = tmp_path / "model"
    done = engine("train", *data, *RUN, "--out", out, cancel_at="step:1")
    assert done["_rc"] == 0 and done["cancelled"] is True and done["resumable"] is False
    assert "nothing was kept and there is nothing to resume" in warnings_of(done)
    assert not out.exists() and not [p for p in tmp_path.iterdir() if "partial" in p.name]


def test_sigterm_mid_training_leaves_a_resumable_model(data, tmp_path):
    """The real signal: SIGTERM once epoch 2 is under way (its start wrote the checkpoint)."""
    out = tmp_path / "model"
    cmd = [sys.executable, "-m", "engine", "train", *map(str, data), *RUN, "--epochs", "50", "--out", str(out),
           "--events", "jsonl"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=REPO,
                            env=ENGINE_ENV)
    events = []
    for line in proc.stdout:
        events.append(json.loads(line))
        if events[-1]["event"] == "progress" and events[-1].get("epoch") == 2:
            break
    proc.send_signal(signal.SIGTERM)
    events += [json.loads(line) for line in proc.stdout]
    assert proc.wait(timeout=120) == 0
    done = events[-1]
    assert done["event"] == "done" and done["cancelled"] is True and done["resumable"] is True
    info = json.loads((out / "resume.json").read_text())
    assert info["epochs_done"] >= 1 and info["epochs"] == 50 and (out / "resume.ckpt").exists()
    message = next(e["message"] for e in events if e["event"] == "warning" and "cancelled" in e["message"])
    assert "of 50" in message and "--resume" in message

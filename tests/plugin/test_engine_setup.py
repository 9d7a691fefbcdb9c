""""Set up engine…" beyond Debian: the requirement set, the commands, $GEOPEFT_ENGINE_PYTHON.

The fast tests check the set-up's requirement set against the engine's pyproject.toml, its
markers on each platform and the commands the dialog runs. The slow ones run
scripts/check_engine_setup.py: a real set-up into a fresh venv with the engine's smoke test (a),
and the wheel table for Linux, Windows and macOS on Python 3.10-3.13 (b); both need the network
(PyPI) and several minutes (``make check-setup``, CI's last step).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from plugin_testdata import REPO

from qgis_plugin.core.setup_engine import (
    TORCH_CPU_INDEX_URL,
    engine_requirements,
    requirement_name,
    setup_steps,
    torch_index_url,
)

SCRIPT = REPO / "scripts" / "check_engine_setup.py"
QGIS_PROCESS = Path("/usr/bin/qgis_process.bin")


def _requirement(text: str):
    from packaging.requirements import Requirement
    return Requirement(text)


def _environment(sys_platform: str, machine: str, python: str = "3.12") -> dict[str, str]:
    return {"sys_platform": sys_platform, "platform_machine": machine, "python_version": python,
            "platform_system": {"linux": "Linux", "win32": "Windows", "darwin": "Darwin"}[sys_platform],
            "os_name": "nt" if sys_platform == "win32" else "posix"}


def _installed(requirements: list[str], environment: dict[str, str]) -> list[str]:
    """What pip installs on that platform: the requirements whose markers hold there."""
    return [requirement_name(r) for r in requirements
            if _requirement(r).marker is None or _requirement(r).marker.evaluate(environment)]


def test_requirement_set_covers_the_engine_dependencies():
    """Every dependency of the engine's pyproject.toml is in the set-up's set, with at least
    its lower bound; onnxruntime stands for onnxruntime-gpu; no pins (Debian's numpy/attrs)."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    ours = {requirement_name(r): _requirement(r) for r in engine_requirements()}
    for text in project["dependencies"]:
        theirs = _requirement(text)
        name = requirement_name(theirs.name)
        name = "onnxruntime" if name == "onnxruntime-gpu" else name
        assert name in ours, f"{text} is missing from engine_requirements()"
        for spec in theirs.specifier:
            if spec.operator == ">=":
                bounds = [s.version for s in ours[name].specifier if s.operator == ">="]
                assert bounds and _version(bounds[0]) >= _version(spec.version), (text, bounds)
    for requirement in engine_requirements() + engine_requirements(gpu=True):
        spec = requirement.split(";")[0]
        assert "==" not in spec and "<" not in spec, requirement
        assert requirement_name(requirement) != "attrs"
    assert set(ours) - {requirement_name(r) for r in project["dependencies"]} == \
        {"torchvision", "onnxruntime"}


def _version(text: str):
    from packaging.version import Version
    return Version(text)


@pytest.mark.parametrize("platform,machine,gpu_runtime", [
    ("linux", "x86_64", "onnxruntime-gpu"), ("win32", "AMD64", "onnxruntime-gpu"),
    ("darwin", "arm64", "onnxruntime"), ("darwin", "x86_64", "onnxruntime"),
    ("linux", "aarch64", "onnxruntime")])
def test_markers_pick_one_onnxruntime_per_platform(platform, machine, gpu_runtime):
    environment = _environment(platform, machine)
    cpu = _installed(engine_requirements(), environment)
    gpu = _installed(engine_requirements(gpu=True), environment)
    assert [n for n in cpu if n.startswith("onnxruntime")] == ["onnxruntime"]
    assert [n for n in gpu if n.startswith("onnxruntime")] == [gpu_runtime]
    assert set(cpu) - {"onnxruntime"} == set(gpu) - {gpu_runtime}
    assert {"torch", "rasterio", "fiona", "numpy"} <= set(cpu)


def test_torch_index():
    assert torch_index_url(platform="linux", environ={}) == TORCH_CPU_INDEX_URL
    assert torch_index_url(gpu=True, platform="linux", environ={}) is None  # PyPI's CUDA build
    assert torch_index_url(platform="win32", environ={}) is None  # PyPI's wheels are CPU builds
    assert torch_index_url(platform="darwin", environ={}) is None
    variable = {"GEOPEFT_TORCH_INDEX_URL": "https://mirror/torch"}
    assert torch_index_url(platform="win32", environ=variable) == "https://mirror/torch"
    assert torch_index_url(platform="linux", environ={"GEOPEFT_TORCH_INDEX_URL": ""}) is None


def test_setup_steps_install_the_requirement_set(tmp_path):
    venv = tmp_path / "venv"
    python = str(venv / "bin" / "python")
    steps = setup_steps(venv, source_dir=REPO, python="/usr/bin/python3", environ={})
    assert [s.label.split(" (")[0] for s in steps] == [
        "Creating the engine environment", "Updating pip", "Installing PyTorch",
        "Installing the engine's dependencies", "Installing the engine", "Checking the engine"]
    assert steps[0].argv == ["/usr/bin/python3", "-m", "venv", str(venv)]
    assert "--system-site-packages" not in steps[0].argv
    torch, deps, engine, check = (s.argv for s in steps[2:])
    assert torch[:4] == [python, "-m", "pip", "--disable-pip-version-check"]
    assert torch[torch.index("--index-url") + 1] == TORCH_CPU_INDEX_URL
    assert torch[-2:] == ["torch>=2.4", "torchvision>=0.19"]
    assert deps[-len(engine_requirements()):] == engine_requirements()
    assert deps[deps.index("--only-binary") + 1] == ":all:" and "--index-url" not in deps
    assert engine[-2:] == ["--no-deps", str(REPO)]
    assert "import engine" in check[-1] and "onnxruntime" in check[-1]
    assert not [a for s in steps for a in s.argv if "constraints" in a or a.startswith("numpy==")]
    # $GEOPEFT_TORCH_INDEX_URL empty: torch from pip's own index, with the rest
    plain = setup_steps(venv, source_dir=REPO, python="/usr/bin/python3",
                        environ={"GEOPEFT_TORCH_INDEX_URL": ""})
    assert len(plain) == 5 and not [s for s in plain if "--index-url" in s.argv]
    gpu = setup_steps(venv, source_dir=REPO, python="/usr/bin/python3", gpu=True, environ={})
    assert gpu[2].argv[-len(engine_requirements(True)):] == engine_requirements(gpu=True)


def test_setup_dialog_offers_the_gpu_variant(qgis_iface, monkeypatch):
    """CPU by default; the dialog's "For an NVIDIA GPU" box asks setup_steps for the GPU set."""
    from qgis_plugin.dialogs import setup_dialog
    asked = []

    def steps(venv, **options):
        asked.append(options)
        raise setup_dialog.SetupError("not now")
    monkeypatch.setattr(setup_dialog, "setup_steps", steps)
    d = setup_dialog.SetupDialog(qgis_iface)
    try:
        assert not d.gpu.isChecked()
        assert d.start_setup() is None
        d.gpu.setChecked(True)
        assert d.start_setup() is None
        assert asked == [{"gpu": False}, {"gpu": True}]
    finally:
        d.close()


def test_the_zip_carries_no_debian_pins(tmp_path):
    import zipfile

    from qgis_plugin.packaging import build_zip
    names = zipfile.ZipFile(build_zip(tmp_path)).namelist()
    assert "geopeft/engine_src/pyproject.toml" in names
    assert "geopeft/engine_src/constraints.txt" not in names


def test_engine_python_from_the_environment_variable(qgis_app, monkeypatch, tmp_path):
    """$GEOPEFT_ENGINE_PYTHON wins over the stored setting (scripts, CI, qgis_process)."""
    from qgis.core import QgsSettings

    from qgis_plugin import settings
    repo_python = str(REPO / ".venv" / "bin" / "python")
    old = QgsSettings().value("geopeft/engine_python", None)
    try:
        settings.set_engine_python(str(tmp_path / "stored" / "python"))
        monkeypatch.setenv("GEOPEFT_ENGINE_PYTHON", repo_python)
        assert settings.engine_python() == repo_python
        monkeypatch.delenv("GEOPEFT_ENGINE_PYTHON")
        assert settings.engine_python() == str(tmp_path / "stored" / "python")
    finally:
        if old is None:
            QgsSettings().remove("geopeft/engine_python")
        else:
            QgsSettings().setValue("geopeft/engine_python", old)


@pytest.mark.skipif(not QGIS_PROCESS.is_file(), reason="qgis_process not installed")
def test_qgis_process_finds_the_engine_through_the_variable(data, fake_python, tmp_path):
    """A fresh profile with the plugin and no engine setting: `qgis_process run` uses
    $GEOPEFT_ENGINE_PYTHON, and without it says how to set up the engine."""
    from qgis_plugin.packaging import install
    root = tmp_path / "config"
    install(root / "profiles" / "default", engine_python=None, repo=REPO)
    assert "engine_python" not in (root / "profiles" / "default" / "QGIS" / "QGIS3.ini").read_text()
    model = tmp_path / "model"
    model.mkdir()
    (model / "card.json").write_text(json.dumps({"classes": [{"value": 1, "name": "a"}]}))
    record = tmp_path / "record"
    record.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GEOPEFT_", "PYTHON"))}
    env.update(QGIS_CUSTOM_CONFIG_PATH=str(root), QT_QPA_PLATFORM="offscreen",
               FAKE_ENGINE_RECORD=str(record))
    argv = [str(QGIS_PROCESS), "run", "geopeft:predict", f"--INPUT={data['scene']}",
            f"--MODEL={model / 'card.json'}", "--BANDS=1,2,3,4,5,6",
            f"--OUTPUT={tmp_path / 'pred.tif'}"]
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "Set up engine" in proc.stdout + proc.stderr
    assert not (record / "argv.json").exists()
    proc = subprocess.run(argv, env={**env, "GEOPEFT_ENGINE_PYTHON": fake_python},
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "predict" in json.loads((record / "argv.json").read_text())


def _script(*args: str, timeout: float) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True,
                          timeout=timeout)
    print(proc.stdout, proc.stderr[-5000:])
    return proc


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_setup_into_a_fresh_venv_and_smoke_test(tmp_path):
    """(a) The plugin's set-up commands into a venv without system site-packages, on this Python,
    then `engine models`, train, predict, export and ONNX predict there. Torch: where pip's index
    holds PyPI's CUDA torch beside a local CPU wheel (this machine, CI), the torch pins of
    constraints.txt choose the CPU one; the PyTorch CPU index is used when it is reachable."""
    constraint = tmp_path / "torch.txt"
    constraint.write_text("".join(line for line in (REPO / "constraints.txt").open()
                                  if line.startswith(("torch==", "torchvision=="))))
    env_index = os.environ.get("GEOPEFT_TORCH_INDEX_URL")
    os.environ.setdefault("GEOPEFT_TORCH_INDEX_URL", "")  # pip's configured index (no CPU index here)
    try:
        proc = _script("install", "--constraint", str(constraint), timeout=3500)
    finally:
        if env_index is None:
            os.environ.pop("GEOPEFT_TORCH_INDEX_URL", None)
    assert proc.returncode == 0
    assert "smoke test:" in proc.stdout and "include-system-site-packages" not in proc.stdout


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_wheels_exist_for_every_platform_and_python():
    """(b) The requirement set resolves to wheels only for Linux, Windows, macOS × 3.10-3.13."""
    proc = _script("wheels", timeout=3500)
    assert proc.returncode == 0
    assert "| Windows (win_amd64) | OK (" in proc.stdout and "no wheel" not in proc.stdout

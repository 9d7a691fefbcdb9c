""""Set up engine": a separate venv with the engine pip-installed into it, QGIS's Python untouched.

The plugin zip carries the engine source (``engine_src/``: ``engine/``, ``pyproject.toml``);
from the repository the source is the repository itself. What is installed besides the engine is
:func:`engine_requirements`, the one list of the set-up's dependencies, with PEP 508 markers so
that the same list serves Linux, Windows and macOS on Python 3.10-3.13. Nothing of the
repository's ``constraints.txt`` (pins for Debian's system GDAL in the developers' venv) is used:
this venv has no system site-packages and takes rasterio/fiona, with GDAL inside, as wheels from
PyPI, with the numpy those wheels were built for.

- Default (CPU): ``onnxruntime`` everywhere; PyTorch's CPU build. On Linux PyPI's torch wheel
  pulls several GB of CUDA libraries, so torch and torchvision come first from PyTorch's CPU
  index (:data:`TORCH_CPU_INDEX_URL`); Windows' and macOS's PyPI wheels are CPU/MPS builds.
- ``gpu=True`` (NVIDIA): ``onnxruntime-gpu`` on Linux/Windows x86-64 and PyPI's torch (CUDA on
  Linux; on Windows set ``$GEOPEFT_TORCH_INDEX_URL`` to a CUDA index of PyTorch's).
- ``$GEOPEFT_TORCH_INDEX_URL`` overrides the torch index; set but empty, torch comes from pip's
  own configured index (a mirror, or an offline wheelhouse).
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping

from .engine_client import IS_WINDOWS, _popen_platform_kwargs, sanitized_env, venv_python
from .protocol import engine_source_dir

TORCH_CPU_INDEX_URL = "https://download.pytorch.org/whl/cpu"
TORCH_INDEX_VARIABLE = "GEOPEFT_TORCH_INDEX_URL"
TORCH_PACKAGES = ("torch", "torchvision")  # installed together, from the same index
SUPPORTED_PYTHONS = ((3, 10), (3, 13))  # what the requirement set is checked on (wheels exist)

# onnxruntime-gpu exists for x86-64 Linux and Windows only (and cannot sit beside onnxruntime:
# both install the `onnxruntime` package)
_ORT_GPU_MARKER = ('(sys_platform == "linux" or sys_platform == "win32") and '
                   '(platform_machine == "x86_64" or platform_machine == "AMD64")')
_ORT_CPU_MARKER = ('(sys_platform != "linux" and sys_platform != "win32") or '
                   '(platform_machine != "x86_64" and platform_machine != "AMD64")')


def engine_requirements(gpu: bool = False) -> list[str]:
    """The set-up's requirement set: the engine's dependencies (pyproject.toml's, which pin the
    developers' GPU machine to onnxruntime-gpu) as installed into a fresh venv on any platform.

    Lower bounds are the oldest releases with wheels for every supported platform and numpy 2
    (rasterio 1.4, fiona 1.10); pip picks the newest wheel for the Python at hand.
    """
    onnxruntime = (["onnxruntime-gpu>=1.18; " + _ORT_GPU_MARKER,
                    "onnxruntime>=1.18; " + _ORT_CPU_MARKER] if gpu else ["onnxruntime>=1.18"])
    return [
        "torch>=2.4",
        "torchvision>=0.19",  # timm's; listed so that it comes from torch's index
        "timm>=1.0",
        "peft>=0.13",
        "lightning>=2.4",
        "torchmetrics>=1.4",
        "rasterio>=1.4",  # wheels carry GDAL and PROJ: no system GDAL, any numpy >= 1.24
        "fiona>=1.10",
        "numpy>=1.24",
        "safetensors>=0.4",
        "huggingface_hub>=0.24",
        "onnx>=1.16",
        "matplotlib>=3.7",  # evaluate --report's charts
        *onnxruntime,
    ]


def requirement_name(requirement: str) -> str:
    """``"onnxruntime>=1.18; marker"`` -> ``"onnxruntime"`` (normalised: lower case, ``-``)."""
    name = requirement.split(";")[0].strip()
    for sep in "<>=!~[ ":
        name = name.split(sep)[0]
    return name.lower().replace("_", "-").replace(".", "-")


def torch_index_url(gpu: bool = False, platform: str = sys.platform,
                    environ: Mapping[str, str] | None = None) -> str | None:
    """Where torch and torchvision come from; None: pip's configured index, with the rest."""
    environ = os.environ if environ is None else environ
    if TORCH_INDEX_VARIABLE in environ:
        return environ[TORCH_INDEX_VARIABLE].strip() or None
    if platform.startswith("linux") and not gpu:
        return TORCH_CPU_INDEX_URL
    return None


@dataclass
class SetupStep:
    label: str
    argv: list[str]


class SetupError(Exception):
    pass


def base_python() -> str | None:
    """A Python that can create a venv (QGIS's own interpreter, not the qgis binary)."""
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    prefixes = [Path(sys.base_exec_prefix), Path(sys.exec_prefix)]
    names = ["python.exe", "python3.exe"] if IS_WINDOWS else [f"python{version}", "python3"]
    candidates = []
    if sys.executable and Path(sys.executable).name.lower().startswith("python"):
        candidates.append(Path(sys.executable))
    for prefix in prefixes:
        for sub in (("",) if IS_WINDOWS else ("bin",)):
            candidates += [prefix / sub / name for name in names]
    candidates += [Path(p) for p in (shutil.which(f"python{version}"), shutil.which("python3"))
                   if p]
    for candidate in candidates:
        if candidate.is_file():
            return str(candidate)
    return None


CHECK_CODE = ("import engine, engine.protocol, torch, rasterio, fiona, onnxruntime; "
              "print('engine', getattr(engine, '__version__', ''), '| torch', torch.__version__, "
              "'| rasterio', rasterio.__version__, '(GDAL', rasterio.__gdal_version__ + ')', "
              "'| onnxruntime', onnxruntime.__version__, onnxruntime.get_available_providers())")


def setup_steps(venv_dir: str | os.PathLike, source_dir: str | os.PathLike | None = None,
                python: str | None = None, extra_pip_args: list[str] | None = None,
                gpu: bool = False, environ: Mapping[str, str] | None = None) -> list[SetupStep]:
    """The commands that create the venv and install the engine into it.

    Torch (with torchvision) first, from :func:`torch_index_url` when there is one; then the
    rest of :func:`engine_requirements` as wheels only (a platform without a wheel fails at once,
    naming the package, instead of compiling GDAL bindings); then the engine itself without
    dependencies (its pyproject.toml names onnxruntime-gpu for the developers' machines).
    """
    source = Path(source_dir) if source_dir else engine_source_dir()
    if source is None or not (source / "pyproject.toml").is_file():
        raise SetupError("The engine source (pyproject.toml, engine/) is not shipped with this "
                         "plugin; install the plugin from the zip built by `make plugin`.")
    if python is None and sys.version_info[:2] < SUPPORTED_PYTHONS[0]:
        raise SetupError(f"The engine needs Python 3.10 or newer; this QGIS runs Python "
                         f"{sys.version_info.major}.{sys.version_info.minor}. Install Python "
                         f"3.10-3.13 and point Engine Python at an environment made with it.")
    python = python or base_python()
    if not python:
        raise SetupError("No Python interpreter found to create the engine environment; "
                         "install Python 3.10+ and try again.")
    venv = Path(venv_dir)
    vpy = str(venv_python(venv))
    pip = [vpy, "-m", "pip", "--disable-pip-version-check", "--no-input"]
    install = pip + ["install", "--progress-bar", "off"] + list(extra_pip_args or [])
    requirements = engine_requirements(gpu)
    steps = [
        SetupStep("Creating the engine environment", [python, "-m", "venv", str(venv)]),
        SetupStep("Updating pip", pip + ["install", "--progress-bar", "off", "--upgrade",
                                         "pip>=24", "setuptools", "wheel"]),
    ]
    index = torch_index_url(gpu, environ=environ)
    if index:
        torch = [r for r in requirements if requirement_name(r) in TORCH_PACKAGES]
        steps.append(SetupStep("Installing PyTorch (CPU build, large download)",
                               install + ["--index-url", index] + torch))
    steps += [
        SetupStep("Installing the engine's dependencies (large download: PyTorch, GDAL)",
                  install + ["--only-binary", ":all:"] + requirements),
        SetupStep("Installing the engine", install + ["--no-deps", str(source)]),
        SetupStep("Checking the engine", [vpy, "-c", CHECK_CODE]),
    ]
    return steps


def run_steps(steps: list[SetupStep], on_step: Callable[[int, SetupStep], None] | None = None,
              on_line: Callable[[str], None] | None = None,
              is_cancelled: Callable[[], bool] = lambda: False) -> bool:
    """Run the steps in order, streaming their output; False if cancelled, SetupError on failure."""
    for index, step in enumerate(steps):
        if is_cancelled():
            return False
        if on_step:
            on_step(index, step)
        if on_line:
            on_line("$ " + " ".join(step.argv))
        proc = subprocess.Popen(step.argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, text=True, errors="replace",
                                env=sanitized_env(), **_popen_platform_kwargs())
        tail: list[str] = []

        def read(stream=proc.stdout):
            for line in stream:
                line = line.rstrip()
                tail.append(line)
                del tail[:-30]
                if on_line:
                    on_line(line)
        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        while proc.poll() is None:
            if is_cancelled():
                proc.terminate()
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                reader.join(timeout=5)
                return False
            time.sleep(0.1)
        reader.join(timeout=5)
        if proc.returncode != 0:
            raise SetupError(f"{step.label} failed (exit status {proc.returncode}):\n"
                             + "\n".join(tail[-10:]))
    return True

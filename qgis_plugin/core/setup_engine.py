""""Set up engine": a separate venv with the engine pip-installed into it, QGIS's Python untouched.

The plugin zip carries the engine source (``engine_src/``: ``engine/``, ``pyproject.toml``,
``constraints.txt``); from the repository the source is the repository itself.
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
from typing import Callable

from .engine_client import IS_WINDOWS, _popen_platform_kwargs, sanitized_env, venv_python
from .protocol import engine_source_dir


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


def setup_steps(venv_dir: str | os.PathLike, source_dir: str | os.PathLike | None = None,
                python: str | None = None, extra_pip_args: list[str] | None = None) -> list[SetupStep]:
    """The commands that create the venv and install the engine into it."""
    source = Path(source_dir) if source_dir else engine_source_dir()
    if source is None or not (source / "pyproject.toml").is_file():
        raise SetupError("The engine source (pyproject.toml, engine/) is not shipped with this "
                         "plugin; install the plugin from the zip built by `make plugin`.")
    python = python or base_python()
    if not python:
        raise SetupError("No Python interpreter found to create the engine environment; "
                         "install Python 3.10+ and try again.")
    venv = Path(venv_dir)
    vpy = str(venv_python(venv))
    pip = [vpy, "-m", "pip", "--disable-pip-version-check", "--no-input"]
    constraints = source / "constraints.txt"
    install = pip + ["install", "--progress-bar", "off"]
    if constraints.is_file():
        install += ["-c", str(constraints)]
    install += list(extra_pip_args or []) + [str(source)]
    return [
        SetupStep("Creating the engine environment", [python, "-m", "venv", str(venv)]),
        SetupStep("Updating pip", pip + ["install", "--progress-bar", "off", "--upgrade",
                                         "pip>=24", "setuptools", "wheel"]),
        SetupStep("Installing the engine and its dependencies (large download: PyTorch)", install),
        SetupStep("Checking the engine", [vpy, "-c", "import engine, engine.protocol; "
                                          "print('engine', getattr(engine, '__version__', ''))"]),
    ]


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

#!/usr/bin/env python3
"""Check the plugin's "Set up engine…" on this machine and its requirement set elsewhere.

    python scripts/check_engine_setup.py install [--venv DIR] [--keep] [--constraint FILE]
    python scripts/check_engine_setup.py wheels [--pythons 3.10,3.12,3.13] [--platforms linux,windows,macos]

``install`` (a): runs :func:`setup_steps` (the commands the plugin's dialog runs) into a fresh
venv without system site-packages, on the Python running this script, then the engine's smoke
test in that venv: ``engine models``, a generated 128 px raster, a one-epoch training, a
prediction, an ONNX export and a prediction with it. It prints each step's time and the venv's
size on disk. ``--constraint`` is given to pip through ``$PIP_CONSTRAINT`` (the commands stay
the plugin's); use it where pip's index holds several torch builds, e.g. a local CPU wheel beside
PyPI's CUDA one.

``wheels`` (b): resolves the requirement set, dependencies included, for other platforms and
Pythons with ``pip install --dry-run --ignore-installed --only-binary=:all: --platform …
--python-version … --report``: only metadata is fetched (PyPI serves it apart from the wheels),
nothing is installed. pip evaluates environment markers (``sys_platform``, ``platform_machine``,
also in the dependencies' metadata, e.g. torch's CUDA packages on Linux) for the machine it runs
on, not for ``--platform``, so pip runs here with the target's marker environment. Prints a table
platform × Python: OK with the key versions, or the package without a wheel. By default pip runs
isolated from this machine's configuration against PyPI (``--index-url``), as an analyst's pip
would; ``--pip-config`` keeps this machine's.

Exit status 0 when everything worked. Run from anywhere; needs network access to the index.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from qgis_plugin.core.engine_client import sanitized_env, venv_python  # noqa: E402
from qgis_plugin.core.setup_engine import (  # noqa: E402
    engine_requirements,
    requirement_name,
    run_steps,
    setup_steps,
)

PYPI = "https://pypi.org/simple"

# The wheel tags pip may take for each platform: glibc 2.17-2.35 (Ubuntu 22.04, Debian 12 and
# newer QGIS hosts), 64-bit Windows, Apple silicon macOS 14 (pip adds the older macOS tags).
PLATFORMS = {
    "linux": {"tags": [f"manylinux_2_{minor}_x86_64" for minor in range(35, 16, -1)]
                      + ["manylinux2014_x86_64"],
              "markers": {"sys_platform": "linux", "platform_system": "Linux", "os_name": "posix",
                          "platform_machine": "x86_64"},
              "label": "Linux x86_64 (manylinux)"},
    "windows": {"tags": ["win_amd64"],
                "markers": {"sys_platform": "win32", "platform_system": "Windows",
                            "os_name": "nt", "platform_machine": "AMD64"},
                "label": "Windows (win_amd64)"},
    "macos": {"tags": ["macosx_14_0_arm64"],
              "markers": {"sys_platform": "darwin", "platform_system": "Darwin",
                          "os_name": "posix", "platform_machine": "arm64"},
              "label": "macOS arm64"},
}
PYTHON_PATCH = {"3.10": "3.10.16", "3.11": "3.11.11", "3.12": "3.12.8", "3.13": "3.13.1"}
NETWORK_SETTINGS = ("PIP_CERT", "PIP_CLIENT_CERT", "PIP_PROXY", "PIP_DEFAULT_TIMEOUT", "PIP_RETRIES",
                    "PIP_TRUSTED_HOST")
KEY_PACKAGES = ("torch", "numpy", "rasterio", "fiona", "onnxruntime", "onnxruntime-gpu")

# pip, run with a given marker environment: argv[1] is the environment (JSON), the rest pip's
PIP_WITH_MARKERS = """
import json, sys
import pip._vendor.packaging.markers as markers
target = json.loads(sys.argv[1])
real = markers.default_environment
def default_environment():
    env = dict(real())
    env.update(target)
    return env
markers.default_environment = default_environment
from pip._internal.cli.main import main
sys.exit(main(sys.argv[2:]))
"""


def marker_environment(platform: str, python: str) -> dict[str, str]:
    full = PYTHON_PATCH.get(python, python + ".0")
    env = dict(PLATFORMS[platform]["markers"])
    env.update(python_version=python, python_full_version=full, implementation_version=full,
               implementation_name="cpython", platform_python_implementation="CPython",
               platform_release="", platform_version="")
    return env


def pip_environment(pip_config: bool) -> dict[str, str]:
    env = dict(os.environ)
    if not pip_config:  # no configured indexes, wheelhouses or constraints; keep the network's
        for name in list(env):
            if name.startswith("PIP_") and name not in NETWORK_SETTINGS:
                env.pop(name)
        env["PIP_CONFIG_FILE"] = os.devnull
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    return env


def resolve(platform: str, python: str, requirements: list[str], work: Path, index_url: str | None,
            pip_config: bool) -> dict:
    """One cell of the table: pip's dry-run resolution for this platform and Python."""
    report = work / f"{platform}-{python}.json"
    argv = [sys.executable, "-c", PIP_WITH_MARKERS, json.dumps(marker_environment(platform, python)),
            "install", "--dry-run", "--ignore-installed", "--quiet", "--no-input",
            "--only-binary=:all:", "--implementation", "cp", "--python-version", python,
            "--report", str(report)]
    for tag in PLATFORMS[platform]["tags"]:
        argv += ["--platform", tag]
    if index_url:
        argv += ["--index-url", index_url]
    argv += requirements
    start = time.monotonic()
    proc = subprocess.run(argv, capture_output=True, text=True, env=pip_environment(pip_config),
                          timeout=1800)
    cell = {"platform": platform, "python": python, "seconds": round(time.monotonic() - start, 1)}
    if proc.returncode == 0 and report.is_file():
        installs = json.loads(report.read_text())["install"]
        versions = {requirement_name(item["metadata"]["name"]): item["metadata"]["version"]
                    for item in installs}
        cell.update(ok=True, versions=versions, count=len(installs),
                    wheels=[Path(item["download_info"]["url"]).name for item in installs])
        return cell
    missing = sorted(set(re.findall(r"No matching distribution found for ([A-Za-z0-9_.\-]+)",
                                    proc.stderr)))
    cell.update(ok=False, missing=missing, error=proc.stderr.strip().splitlines()[-6:])
    return cell


def describe(cell: dict) -> str:
    if cell["ok"]:
        versions = cell["versions"]
        keys = [f"{name} {versions[name]}" for name in KEY_PACKAGES if name in versions]
        return f"OK ({cell['count']} wheels: " + ", ".join(keys) + ")"
    if cell["missing"]:
        return "no wheel: " + ", ".join(cell["missing"])
    return "FAILED: " + (cell["error"][-1] if cell["error"] else "(no output)")


def check_wheels(args) -> int:
    pythons = [p.strip() for p in args.pythons.split(",") if p.strip()]
    platforms = [p.strip() for p in args.platforms.split(",") if p.strip()]
    requirements = engine_requirements(gpu=args.gpu)
    print("requirement set" + (" (gpu)" if args.gpu else "") + ":")
    for requirement in requirements:
        print("   ", requirement)
    index_url = None if args.pip_config else args.index_url
    print(f"index: {index_url or 'pip configuration of this machine'}; "
          f"{len(platforms) * len(pythons)} resolutions, {args.jobs} at a time", flush=True)
    with tempfile.TemporaryDirectory(prefix="geopeft-wheels-") as tmp:
        cells = [(platform, python) for platform in platforms for python in pythons]
        with ThreadPoolExecutor(args.jobs) as pool:
            results = list(pool.map(lambda c: resolve(*c, requirements, Path(tmp), index_url,
                                                      args.pip_config), cells))
    table = {(c["platform"], c["python"]): c for c in results}
    print()
    print("| platform | " + " | ".join(f"Python {p}" for p in pythons) + " |")
    print("|---|" + "---|" * len(pythons))
    for platform in platforms:
        row = [describe(table[platform, python]) for python in pythons]
        print(f"| {PLATFORMS[platform]['label']} | " + " | ".join(row) + " |")
    for cell in results:
        if not cell["ok"]:
            print(f"\n{cell['platform']} {cell['python']}:", *cell["error"], sep="\n  ")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    print(f"\nslowest resolution: {max(c['seconds'] for c in results):.0f} s")
    return 0 if all(c["ok"] for c in results) else 1


def du(path: Path) -> int:
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except OSError:
                pass
    return total


def engine(python: str, *args: str, timeout: float = 900) -> dict:
    """Run ``python -m engine <args> --events jsonl`` as the plugin does; its done event."""
    argv = [python, "-m", "engine", args[0], "--events", "jsonl", *args[1:]]
    start = time.monotonic()
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                          env=sanitized_env(python=python), cwd=str(Path(python).parent),
                          stdin=subprocess.DEVNULL)
    events = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    done = next((e for e in reversed(events) if e.get("event") == "done"), {})
    if proc.returncode != 0 or not done.get("ok"):
        raise SystemExit(f"engine {args[0]} failed (exit {proc.returncode}):\n"
                         + "\n".join(proc.stderr.splitlines()[-25:]))
    print(f"  engine {args[0]:<10} {time.monotonic() - start:6.1f} s")
    return done


def smoke_test(python: str, work: Path) -> None:
    """The engine in the new venv: models, a generated raster, train, predict, export, ONNX."""
    models = engine(python, "models")
    names = [m["name"] for m in models["models"]]
    assert "prithvi_eo_v2_tiny" in names, names
    data = work / "data"
    engine(python, "demo-data", "--out", str(data), "--size", "128")
    model = work / "model"
    engine(python, "train", "--image", str(data / "scene.tif"), "--labels", str(data / "labels.tif"),
           "--backbone", "prithvi_eo_v2_tiny", "--weights", "none", "--chip-size", "64",
           "--epochs", "1", "--batch-size", "4", "--device", "cpu", "--out", str(model))
    engine(python, "predict", "--model", str(model), "--image", str(data / "scene.tif"),
           "--out", str(work / "pred.tif"), "--device", "cpu")
    engine(python, "export", "--model", str(model), "--out", str(work / "model.onnx"))
    engine(python, "predict", "--model", str(work / "model.onnx"), "--image",
           str(data / "scene.tif"), "--out", str(work / "pred_onnx.tif"), "--device", "cpu")
    check = subprocess.run(
        [python, "-c", "import rasterio, numpy as np; a, b = (rasterio.open(p).read(1) for p in "
         "__import__('sys').argv[1:]); print(a.shape, 'agree', float((a == b).mean()))",
         str(work / "pred.tif"), str(work / "pred_onnx.tif")],
        capture_output=True, text=True, env=sanitized_env(python=python), timeout=120)
    print("  predictions (PyTorch vs ONNX):", check.stdout.strip() or check.stderr.strip()[-300:])
    if check.returncode != 0:
        raise SystemExit("reading the predictions failed")


def check_install(args) -> int:
    if args.constraint:
        os.environ["PIP_CONSTRAINT"] = str(Path(args.constraint).resolve())
    work = Path(tempfile.mkdtemp(prefix="geopeft-setup-"))
    venv = Path(args.venv) if args.venv else work / "venv"
    if venv.exists():
        shutil.rmtree(venv)
    steps = setup_steps(venv, source_dir=REPO, python=args.python or None, gpu=args.gpu)
    log = work / "setup.log"
    print(f"venv {venv} (log: {log})")
    print(f"python {args.python or 'base_python()'}; PIP_CONSTRAINT="
          f"{os.environ.get('PIP_CONSTRAINT', '')}", flush=True)
    timings = []
    total = time.monotonic()
    with log.open("w") as out:
        for step in steps:
            start = time.monotonic()
            print(f"  {step.label} …", flush=True)
            out.write("$ " + " ".join(step.argv) + "\n")
            try:
                run_steps([step], on_line=lambda line: out.write(line + "\n"))
            except Exception as exc:  # noqa: BLE001 - reported, with the log's tail
                out.flush()
                print(f"FAILED: {exc}\n--- {log} (tail)\n" + "\n".join(
                    log.read_text().splitlines()[-30:]))
                return 1
            timings.append((step.label, time.monotonic() - start))
            print(f"    {timings[-1][1]:6.1f} s   $ {' '.join(step.argv)[:300]}", flush=True)
    setup_seconds = time.monotonic() - total
    print("  checked:", log.read_text().strip().splitlines()[-1])
    size = du(venv)
    print(f"set-up: {setup_seconds:.0f} s, venv {size / 2**30:.2f} GiB ({size / 2**20:.0f} MiB)")
    python = str(venv_python(venv))
    cfg = (venv / "pyvenv.cfg").read_text()
    assert "include-system-site-packages = false" in cfg, cfg
    freeze = subprocess.run([python, "-m", "pip", "list", "--format", "freeze"],
                            capture_output=True, text=True, env=sanitized_env(python=python))
    versions = dict(line.split("==", 1) for line in freeze.stdout.split() if "==" in line)
    print("  " + ", ".join(f"{n} {versions[n]}" for n in
                           ("torch", "torchvision", "numpy", "rasterio", "fiona", "onnxruntime",
                            "onnxruntime-gpu", "attrs") if n in versions))
    start = time.monotonic()
    smoke_test(python, work)
    print(f"smoke test: {time.monotonic() - start:.0f} s")
    if args.keep or args.venv:
        print(f"kept {work}" + (f" and {venv}" if args.venv else ""))
    else:
        shutil.rmtree(work, ignore_errors=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    i = sub.add_parser("install", help="(a) set up a fresh venv as the plugin does, smoke-test it")
    i.add_argument("--venv", help="venv folder (default: a temporary one, removed afterwards)")
    i.add_argument("--python", help="Python that creates the venv (default: as the plugin picks)")
    i.add_argument("--constraint", help="pip constraints for the installs ($PIP_CONSTRAINT)")
    i.add_argument("--gpu", action="store_true", help="the GPU variant of the set-up")
    i.add_argument("--keep", action="store_true", help="keep the temporary folder")
    w = sub.add_parser("wheels", help="(b) binary wheels for other platforms and Pythons")
    w.add_argument("--pythons", default="3.10,3.11,3.12,3.13")
    w.add_argument("--platforms", default=",".join(PLATFORMS))
    w.add_argument("--gpu", action="store_true", help="the GPU variant of the requirement set")
    w.add_argument("--index-url", default=PYPI)
    w.add_argument("--pip-config", action="store_true",
                   help="use this machine's pip configuration instead of --index-url alone")
    w.add_argument("--jobs", type=int, default=4)
    w.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)
    return check_install(args) if args.command == "install" else check_wheels(args)


if __name__ == "__main__":
    sys.exit(main())

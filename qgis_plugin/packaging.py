"""Build the installable plugin zip and install the plugin into a QGIS profile.

Used by ``make plugin`` / ``make qgis`` (and the tests); not part of the installed plugin.

    python qgis_plugin/packaging.py zip --out dist/
    python qgis_plugin/packaging.py install --profile-dir ~/.local/share/QGIS/QGIS3/profiles/default \
        --engine-python "$PWD/.venv/bin/python"

The zip holds one folder, ``geopeft/``: this plugin folder (without this file and caches) plus
``geopeft/engine_src/`` with ``engine/`` and ``pyproject.toml`` — the source "Set up engine"
pip-installs (its dependencies: ``core/setup_engine.py``'s ``engine_requirements``), and where
the plugin loads ``engine/protocol.py`` from.
Run with any Python 3 (plain file copying; QSettings-compatible INI editing without Qt).
"""
from __future__ import annotations

import argparse
import configparser
import os
import re
import shutil
import sys
import zipfile
from pathlib import Path

PLUGIN_NAME = "geopeft"
PLUGIN_DIR = Path(__file__).resolve().parent
REPO = PLUGIN_DIR.parent
EXCLUDE_NAMES = {"__pycache__", ".pytest_cache", "packaging.py", ".DS_Store"}
EXCLUDE_SUFFIXES = {".pyc", ".pyo", ".partial"}
ENGINE_FILES = ("pyproject.toml", "README.md", "LICENSE")  # not constraints.txt: Debian pins


def version() -> str:
    parser = configparser.ConfigParser()
    parser.read(PLUGIN_DIR / "metadata.txt", encoding="utf-8")
    return parser["general"]["version"]


def _wanted(path: Path) -> bool:
    return not (set(path.parts) & EXCLUDE_NAMES) and path.suffix not in EXCLUDE_SUFFIXES


def plugin_files(repo: Path = REPO) -> list[tuple[Path, str]]:
    """(source file, path inside the zip) for everything the installed plugin needs."""
    files = []
    plugin_dir = repo / "qgis_plugin"
    for path in sorted(plugin_dir.rglob("*")):
        rel = path.relative_to(plugin_dir)
        if path.is_file() and _wanted(rel):
            files.append((path, f"{PLUGIN_NAME}/{rel.as_posix()}"))
    for path in sorted((repo / "engine").rglob("*")):
        rel = path.relative_to(repo)
        if path.is_file() and _wanted(rel):
            files.append((path, f"{PLUGIN_NAME}/engine_src/{rel.as_posix()}"))
    for name in ENGINE_FILES:
        if (repo / name).is_file():
            files.append((repo / name, f"{PLUGIN_NAME}/engine_src/{name}"))
    return files


def sync_root_metadata(repo: Path = REPO) -> Path:
    """The repository's top-level metadata.txt is a copy of qgis_plugin/metadata.txt."""
    target = repo / "metadata.txt"
    source = (repo / "qgis_plugin" / "metadata.txt").read_bytes()
    if not target.is_file() or target.read_bytes() != source:
        target.write_bytes(source)
    return target


def build_zip(out_dir: Path, repo: Path = REPO) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / f"{PLUGIN_NAME}-{version()}.zip"
    tmp = target.with_suffix(".zip.partial")
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as zf:
        for source, arcname in plugin_files(repo):
            zf.write(source, arcname)
    os.replace(tmp, target)
    return target


def install(profile_dir: Path, engine_python: str | None = None, repo: Path = REPO,
            zip_path: Path | None = None) -> Path:
    """Copy the plugin into ``<profile>/python/plugins/geopeft``, enable it, set the engine."""
    plugins = profile_dir / "python" / "plugins"
    target = plugins / PLUGIN_NAME
    if target.exists():
        shutil.rmtree(target)
    plugins.mkdir(parents=True, exist_ok=True)
    if zip_path is not None:
        with zipfile.ZipFile(zip_path) as zf:
            zf.extractall(plugins)
    else:
        for source, arcname in plugin_files(repo):
            dest = plugins / arcname
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, dest)
    values = {("PythonPlugins", PLUGIN_NAME): "true"}
    if engine_python:
        values[("geopeft", "engine_python")] = str(engine_python)
    set_ini_values(profile_dir / "QGIS" / "QGIS3.ini", values)
    return target


def set_ini_values(path: Path, values: dict[tuple[str, str], str]) -> None:
    """Set keys in a Qt INI file (QGIS3.ini) in place, leaving every other line untouched."""
    lines = path.read_text(encoding="utf-8").splitlines() if path.is_file() else []
    for (section, key), value in values.items():
        header = f"[{section}]"
        start = next((i for i, line in enumerate(lines) if line.strip() == header), None)
        if start is None:
            if lines and lines[-1].strip():
                lines.append("")
            lines += [header, f"{key}={_ini_value(value)}"]
            continue
        end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("[")), len(lines))
        pattern = re.compile(rf"^{re.escape(key)}\s*=")
        found = next((i for i in range(start + 1, end) if pattern.match(lines[i])), None)
        if found is None:
            insert_at = end
            while insert_at > start + 1 and not lines[insert_at - 1].strip():
                insert_at -= 1
            lines.insert(insert_at, f"{key}={_ini_value(value)}")
        else:
            lines[found] = f"{key}={_ini_value(value)}"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def _ini_value(value: str) -> str:
    """QSettings quotes values with special characters and escapes backslashes."""
    escaped = value.replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}"' if re.search(r'[;,=#"\\\s]', value) else escaped


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    z = sub.add_parser("zip", help="build dist/geopeft-<version>.zip")
    z.add_argument("--out", default=str(REPO / "dist"))
    i = sub.add_parser("install", help="install into a QGIS profile and enable it")
    i.add_argument("--profile-dir", required=True)
    i.add_argument("--engine-python", default="")
    i.add_argument("--zip", default="", help="install from this zip (default: the source tree)")
    i.add_argument("--zip-dir", default="", help="install dist's geopeft-<version>.zip from here")
    args = parser.parse_args(argv)
    if args.command == "zip":
        sync_root_metadata()
        print(build_zip(Path(args.out)))
    else:
        zip_path = Path(args.zip) if args.zip else None
        if args.zip_dir:
            zip_path = Path(args.zip_dir) / f"{PLUGIN_NAME}-{version()}.zip"
        if zip_path is not None and not zip_path.is_file():
            parser.error(f"{zip_path} not found: run `make plugin` first")
        target = install(Path(args.profile_dir).expanduser(), args.engine_python or None,
                         zip_path=zip_path)
        print(f"installed {target} (enabled; engine python: {args.engine_python or 'default'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The analyst's loop on the demo scene, timed: label a little, train, look where the model is
unsure, label there, continue training from the model; held-out mIoU after every round.

    python bench/analyst_loop.py [--out DIR] [--size 512] [--budget 90s] [--rounds 3]

The "analyst" is simulated: round 1 labels two small squares per class (deliberately incomplete);
after each round the engine lists the most uncertain squares (``predict --uncertain-areas``) and
the true labels are added in the first ``--areas`` of them that lie in the training part of the
scene (the right 40 % is held out for scoring and never labelled). Each later round continues from
the previous model (``train --init-from``). ``--scratch`` also trains the last round's labels from
scratch with the rounds' epochs and time together, to show what continuing is worth. Prints a
Markdown table.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import fiona
import rasterio

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from engine.data.demo import make_demo_scene  # noqa: E402
from engine.demo import add_labels, first_labels, split_labels  # noqa: E402
from engine.protocol import parse_duration  # noqa: E402


def engine(*args) -> dict:
    cmd = [sys.executable, "-m", "engine", *map(str, args), "--events", "jsonl"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    events = [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]
    done = next((e for e in events if e["event"] == "done"), {})
    if proc.returncode or not done.get("ok"):
        sys.exit(f"engine {args[0]} failed:\n{proc.stderr[-3000:]}")
    return done


def labelled(path: Path) -> int:
    with rasterio.open(path) as src:
        data = src.read(1)
        return int((data != src.nodata).sum())


def areas_to_label(areas_gpkg: Path, train_labels: Path, wanted: int) -> list[tuple[int, int, int, int]]:
    """Pixel boxes (row, col, height, width) of the most uncertain squares, best first, that lie
    in the part of the scene the analyst labels."""
    with rasterio.open(train_labels) as src:
        known = src.read(1) != src.nodata
        inverse = ~src.transform
    boxes = []
    with fiona.open(areas_gpkg, layer="uncertain_areas") as layer:
        for feature in sorted(layer, key=lambda f: f["properties"]["rank"]):
            xs, ys = zip(*feature["geometry"]["coordinates"][0])
            cols, rows = zip(*(inverse @ (x, y) for x, y in zip(xs, ys)))
            r0, c0 = round(min(rows)), round(min(cols))
            h, w = round(max(rows)) - r0, round(max(cols)) - c0
            if known[r0:r0 + h, c0:c0 + w].mean() >= 0.9:
                boxes.append((r0, c0, h, w))
            if len(boxes) == wanted:
                break
    return boxes


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="bench_loop")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--budget", default="90s", help="training time per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--areas", type=int, default=6, help="squares labelled after each round")
    parser.add_argument("--area-size", type=int, default=32, help="side of the squares, pixels")
    parser.add_argument("--weights", default="auto", help="backbone weights (auto: pretrained when cached)")
    parser.add_argument("--scratch", action="store_true", help="also train the last labels from scratch")
    a = parser.parse_args(argv)
    out = Path(a.out)
    scene = make_demo_scene(out / "data", size=a.size)
    train_labels, test_labels = split_labels(scene.labels, out / "data")
    labels = first_labels(train_labels, out / "labels_1.tif", square=16, per_class=2)
    rows, model, started = [], None, time.monotonic()
    for n in range(1, a.rounds + 1):
        folder = out / f"round{n}"
        t0 = time.monotonic()
        start = ["--init-from", model] if model else ["--weights", a.weights]
        trained = engine("train", "--image", scene.image, "--labels", labels, *start, "--max-time", a.budget,
                         "--out", folder)
        seconds = time.monotonic() - t0
        pred, unc, areas = out / f"prediction_{n}.tif", out / f"uncertainty_{n}.tif", out / f"areas_{n}.gpkg"
        engine("predict", "--model", folder, "--image", scene.image, "--out", pred, "--uncertainty", unc,
               "--uncertain-areas", areas, "--area-count", 40, "--area-size", a.area_size)
        miou = engine("evaluate", "--prediction", pred, "--labels", test_labels)["miou"]
        rows.append((f"{n}" + (" (continued)" if model else ""), labelled(labels), trained["epochs"], seconds, miou))
        model = folder
        if n < a.rounds:
            boxes = areas_to_label(areas, train_labels, a.areas)
            labels = add_labels(labels, train_labels, boxes, out / f"labels_{n + 1}.tif")
    total = time.monotonic() - started
    if a.scratch:
        budget = parse_duration(a.budget) * a.rounds
        t0 = time.monotonic()
        epochs = sum(row[2] for row in rows)  # the same training as all the rounds together
        trained = engine("train", "--image", scene.image, "--labels", labels, "--weights", a.weights, "--max-time",
                         f"{budget:.0f}s", "--epochs", epochs, "--out", out / "scratch")
        seconds = time.monotonic() - t0
        engine("predict", "--model", out / "scratch", "--image", scene.image, "--out", out / "prediction_scratch.tif")
        miou = engine("evaluate", "--prediction", out / "prediction_scratch.tif", "--labels", test_labels)["miou"]
        rows.append(("last labels, from scratch", labelled(labels), trained["epochs"], seconds, miou))
    card = json.loads((model / "card.json").read_text())
    print(f"\nAnalyst's loop on the {a.size} px demo scene ({card['backbone']['name']}, "
          f"{card['backbone']['weights']['source']} weights, {card['tuning']['method']}; {a.budget} per round; "
          f"{a.areas} squares of {a.area_size} px labelled after each round; held-out right 40 %)\n")
    print("| round | labelled px | epochs | train time | held-out mIoU |")
    print("|---|---|---|---|---|")
    for name, pixels, epochs, seconds, miou in rows:
        print(f"| {name} | {pixels:,} | {epochs} | {seconds / 60:.1f} min | {miou:.3f} |")
    print(f"\nthe whole loop (training, prediction, uncertain areas, scoring): {total / 60:.1f} min")


if __name__ == "__main__":
    main()

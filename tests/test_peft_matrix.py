"""bench/peft_matrix.py: its options, one tiny cell of each kind (in this process, without the
fresh child processes of a real run) and the table with its footer."""
from __future__ import annotations

from bench import peft_matrix as matrix


def test_options_and_quick_mode():
    args = matrix.parse_args(["--quick", "--methods", "lora,full"])
    assert args.backbones.split(",") == list(matrix.QUICK_BACKBONES) and args.budget == 5
    assert args.methods == "lora,full"
    args = matrix.parse_args(["--backbones", "prithvi_eo_v2_100", "--budget", "30", "--steps", "6"])
    assert (args.backbones, args.budget, args.steps, args.terratorch) == ("prithvi_eo_v2_100", 30, 6, None)


def test_bands_are_picked_by_name_from_the_13_band_chip():
    assert matrix.chip_bands("prithvi_eo_v2_100") == ([2, 3, 4, 9, 12, 13], ["B2", "B3", "B4", "B8A", "B11", "B12"])


def test_one_tiny_cell(tmp_path):
    step = matrix.step_cell("prithvi_eo_v2_tiny", "lora", steps=2, chip=32, batch=2)
    assert step["trainable"] < step["total"] and step["peak_rss_mib"] > 0 and step["s_per_step"] > 0
    assert "error" in matrix.step_cell("prithvi_eo_v2_tiny", "no-such-method", steps=1, chip=32)
    train, test = matrix.label_halves(tmp_path)
    cell = matrix.miou_cell("prithvi_eo_v2_tiny", "lora", 1, str(train), str(test), str(tmp_path / "cell"))
    assert 0 <= cell["miou"] <= 1 and cell["steps"] > 0 and cell["weights"] == "random"


def test_table_footer_gives_the_ratios():
    def step(mib, s):
        return {"peak_rss_mib": mib, "s_per_step": s, "trainable": 10, "total": 100, "peak_kind": "rss"}

    ref = matrix.REFERENCE
    results = {"cells": [{"backbone": ref, "method": "lora", "weights": "random", "step": step(1200, 1.0),
                          "miou": {"miou": 0.5, "steps": 9}},
                         {"backbone": ref, "method": "full", "weights": "random", "step": step(2400, 1.2),
                          "miou": {"error": "refused"}}],
               "extra": {"terratorch_lora": step(2400, 2.0), "lora_levers_off": step(1800, 0.8)}}
    text = matrix.table(results, matrix.parse_args(["--budget", "60"]))
    assert "random weights" in text and "| 0.500 | 9 |" in text and "n/a [1]" in text and "[1] refused" in text
    assert "LoRA / TerraTorch LoRA (prithvi_eo_v2_100): memory 0.50×, step time 0.50×" in text
    assert "LoRA / our full fine-tuning (prithvi_eo_v2_100): memory 0.50×" in text
    assert "1800 → 1200 MiB" in text

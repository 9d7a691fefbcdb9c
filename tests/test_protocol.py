"""The JSON-lines protocol and the time-budget format shared with the plugin."""


import pytest

from engine.protocol import decode_event, encode_event, parse_duration


@pytest.mark.parametrize("text,seconds", [("90s", 90), ("5m", 300), ("1h", 3600), ("1h30m", 5400),
                                          ("120", 120), (" 2M ", 120), ("", None), (None, None)])
def test_durations(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["soon", "5x", "m5", "1h30", "0s", "-5m"])
def test_bad_durations_are_refused(text):
    with pytest.raises(ValueError):
        parse_duration(text)


def test_events_round_trip_and_other_lines_are_ignored():
    line = encode_event("metric", name="val_miou", value=float("nan"), stage="validate", epoch=2)
    event = decode_event(line)
    assert event == {"v": 1, "event": "metric", "name": "val_miou", "value": None, "stage": "validate", "epoch": 2}
    assert decode_event("Epoch 1: loss 0.5") is None and decode_event('{"event": "unknown", "v": 1}') is None
    with pytest.raises(ValueError):
        encode_event("telemetry")

"""The zoo table: the published checkpoints' shapes, and one measured row."""

import json
import os

import pytest

from mnv2_flax import checkpoint, models, zoo


@pytest.mark.parametrize("name", ["1.0_224", "0.35_96", "1.4_224"])
def test_multiply_adds_match_the_published_table(name):
  entry = next(e for e in zoo.PUBLISHED if e.name == name)
  model, _ = checkpoint.model_from_settings(zoo.keras_settings(entry))
  size = models.size(model, (entry.resolution,) * 2 + (3,))
  # The published figures are rounded to 1 M and count 1001 classes.
  assert abs(size["macs"] / 1e6 - entry.macs_m) <= max(1.0, 0.1 * entry.macs_m)


def test_table_covers_every_published_width_and_resolution():
  names = {e.name for e in zoo.PUBLISHED}
  assert len(names) == 22
  for width in (0.35, 0.5, 0.75, 1.0):
    for resolution in (96, 128, 160, 192, 224):
      assert f"{width}_{resolution}" in names
  assert {"1.3_224", "1.4_224"} <= names


@pytest.mark.slow
def test_one_row_is_measured_and_written(tmp_path):
  pytest.importorskip("ai_edge_litert")
  rows = zoo.main([f"--out={tmp_path}", "--only=0.35_96", "--steps=2", "--warmup=0"])
  (row,) = rows
  assert row["params"] == 1_677_128
  assert 0 < row["tflite_int8_bytes"] < row["tflite_bytes"]
  for key in ("jax_ms", "tflite_ms", "tflite_int8_ms"):
    assert row[key] > 0
  with open(tmp_path / "zoo.json") as f:
    assert json.load(f)["rows"] == rows
  assert "| 0.35 | 96 | 1.68 M | 12 M (11 M) | 45.5 / 70.4 |" in (tmp_path / "zoo.md").read_text()
  assert os.path.getsize(tmp_path / "zoo.png") > 10_000


def test_unknown_entry_is_a_usage_error(tmp_path):
  with pytest.raises(SystemExit) as exit_info:
    zoo.main([f"--out={tmp_path}", "--only=2.0_224"])
  assert exit_info.value.code == 2

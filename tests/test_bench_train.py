"""``make bench-train``'s augmentation sweep: valid variant configs, the table, bad arguments."""
from __future__ import annotations

from pathlib import Path

import pytest

from fieldid.cli import main
from fieldid.training.bench import AUGMENT_VARIANTS, _variant_config, format_augment
from fieldid.training.config import AugmentConfig, TrainConfig, load_config


def test_every_variant_is_a_valid_config_that_changes_only_augmentation(tmp_path: Path) -> None:
    assert _variant_config(tmp_path, "defaults") == []  # the shipped defaults: no --config at all
    for name in AUGMENT_VARIANTS:
        flags = _variant_config(tmp_path, name)
        cfg = load_config(flags[1]) if flags else TrainConfig()
        expected = {**vars(AugmentConfig()), **AUGMENT_VARIANTS[name]}
        assert vars(cfg.augment) == expected, name
        rest = {k: v for k, v in vars(cfg).items() if k != "augment"}
        assert rest == {k: v for k, v in vars(TrainConfig()).items() if k != "augment"}, name
    assert load_config(_variant_config(tmp_path, "strong")[1]).augment.scale_min == 0.35


def test_table_has_a_cell_per_dataset_and_variant_and_names_the_best() -> None:
    rows = [{"dataset": d, "variant": v, "test": 40, "accuracy": acc, "val_accuracy": acc, "seconds": 30.0, "epochs": 5}
            for d, accs in (("faces", (1.0, 0.95, 0.9)), ("reef", (0.9, 0.85, 0.95)))
            for v, acc in zip(("defaults", "strong", "none"), accs)]
    table = format_augment(rows)
    assert "| faces | 40 | 1.000 (30) | 0.950 (30) | 0.900 (30) |" in table
    assert "| mean | | 0.950 | 0.900 | 0.925 |" in table
    assert table.splitlines()[-1] == "best mean test accuracy: defaults (0.950)"
    rows[0]["accuracy"] = 0.5  # now "none" has the best mean
    assert format_augment(rows).splitlines()[-1] == "best mean test accuracy: none (0.925); the shipped defaults: 0.700"


def test_unknown_variant_is_one_line_and_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "train", "augment", "--work", str(tmp_path), "--variants", "defaults,wild"]) == 2
    err = capsys.readouterr().err
    assert err.strip() == "bench augment: error: unknown variant(s) wild; known: defaults, strong, none"
    assert not any(tmp_path.iterdir())  # refused before any dataset was built

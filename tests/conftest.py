from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from helpers import make_shapes_dataset  # noqa: E402


@pytest.fixture(scope="session")
def shapes_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_shapes_dataset(tmp_path_factory.mktemp("shapes") / "data")


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory: pytest.TempPathFactory, shapes_dir: Path) -> Path:
    """A real (tiny, fast) fine-tuned MobileNetV2 run used by export/serve/demo tests."""
    from training import TrainConfig, train

    out = tmp_path_factory.mktemp("runs") / "shapes"
    cfg = TrainConfig(epochs=3, head_epochs=1, image_size=64, batch_size=16, seed=0)
    train(shapes_dir, out, cfg)
    return out

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Iterator

# Tests never download: make the hub clients fail fast instead of waiting on a closed network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from helpers import make_shapes_dataset  # noqa: E402

# Fixture modules contributed by the export/serve/demo test suites are imported here.
from fixtures_serve import *  # noqa: F401,F403,E402
from fixtures_export import *  # noqa: F401,F403,E402
from fixtures_edge_demo import *  # noqa: F401,F403,E402
from fixtures_scaleout import *  # noqa: F401,F403,E402
from fixtures_browser import *  # noqa: F401,F403,E402
# Under CI=true an unexpected skip fails the run (only `gpu`-marked tests may skip there).
from fixtures_ci import (pytest_collectreport, pytest_runtest_makereport, pytest_sessionfinish,  # noqa: F401,E402
                         pytest_terminal_summary)


_START_THREADS: int | None = None  # torch's thread count when the first test started


@pytest.fixture(autouse=True)
def _torch_threads_restored() -> Iterator[None]:
    """Each test ends with torch's thread count as the session began. Loading a runtime with
    ``threads=1`` (TorchScript, predict, bench) sets it process-wide: the training in later tests then
    ran on one thread under ``make test`` and on every core alone, a different path for the same test.
    The count is the session's first, not this test's: a shared fixture set up for this test could
    have changed it already."""
    global _START_THREADS
    import torch

    if _START_THREADS is None:
        _START_THREADS = torch.get_num_threads()
    yield
    if torch.get_num_threads() != _START_THREADS:
        torch.set_num_threads(_START_THREADS)


@pytest.fixture(scope="session")
def shapes_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_shapes_dataset(tmp_path_factory.mktemp("shapes") / "data")


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory: pytest.TempPathFactory, shapes_dir: Path) -> Path:
    """A real (tiny, fast) fine-tuned MobileNetV2 run shared by export/serve/demo tests.

    The training defaults, except what keeps it small (size, epochs, batch): nothing is chosen to make
    a bar pass. The statistical checks on its artifacts are decided on hundreds of images (the
    export's bar images, ``check_set``'s new photos), so one near-tie photo cannot decide them.
    """
    from fieldid.training import TrainConfig
    from fieldid.training.train import train

    out = tmp_path_factory.mktemp("runs") / "shapes"
    cfg = TrainConfig(epochs=3, head_epochs=1, image_size=64, batch_size=16, seed=0)
    train(shapes_dir, out, cfg)
    return out


@pytest.fixture(scope="session")
def tiny_bundle(tiny_run: Path) -> Path:
    """The tiny run exported to the pytorch + ONNX formats (what serve/ and edge_demo/ read)."""
    from fieldid.export import export_run

    export_run(tiny_run, formats=["onnx"])
    return tiny_run / "export"

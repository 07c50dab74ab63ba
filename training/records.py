"""Run-directory records: re-exported from :mod:`fieldid.records` (torch-free, outside training,
so that serve/ and edge_demo/ read them without importing ``fieldid.training``)."""
from __future__ import annotations

from fieldid.records import *  # noqa: F401,F403 - the public names, unchanged for training code
from fieldid.records import Record as _Record  # noqa: F401 - training's historical private name
from fieldid.records import __all__  # noqa: F401

"""The sub-commands of ``fieldid``, one module per stage, in data-flow order.

They live with the face of the project (:mod:`fieldid.cli`, :mod:`fieldid.api`), the only layer that
sees every stage: the stage packages (training, export, serve, edge_demo, app) are libraries that
import nothing above them (``tests/test_package.py`` checks it). Each module has ``register(sub)``
and stays torch-free at import time, so ``fieldid --help`` and ``fieldid demo`` start fast.
"""

"""The Python conformance kit and runner (``tests/README.md``), and the e-commerce example's
Python handlers (``examples/ecommerce/python/handlers.py``).

- ``kit.py``: the ``kit.*`` handlers, the Python twin of ``tests/src/kit.rs``;
- ``runner.py``: loads a scenario file (unknown keys and bad state names are load errors),
  runs it on a fresh ``tasker_core.Tasker`` and lists every mismatch;
- ``test_scenarios.py``: one test per scenario file on SQLite and one on PostgreSQL (a scratch
  database on ``$TASKER_TEST_DATABASE_URL``, dropped afterwards; skipped when unset).

Run from ``python/``: ``pytest tests/conformance`` (``-k "sqlite and checkpoint"`` for a
subset; ``-s`` prints one line per scenario).
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from types import ModuleType

REPO_DIR = Path(__file__).resolve().parents[3]
ECOMMERCE_DIR = REPO_DIR / "examples" / "ecommerce"


def ecommerce_handlers() -> ModuleType:
    """The example's handler module, imported as ``handlers`` from
    ``examples/ecommerce/python`` (put on ``sys.path``), so that the template's callables
    ``handlers.ecommerce.<Class>`` resolve as import paths."""
    directory = str(ECOMMERCE_DIR / "python")
    if directory not in sys.path:
        sys.path.insert(0, directory)
    module = importlib.import_module("handlers")
    if Path(module.__file__ or "").resolve().parent != ECOMMERCE_DIR / "python":
        raise ImportError(f"`handlers` resolves to {module.__file__}, not the example's module")
    return module

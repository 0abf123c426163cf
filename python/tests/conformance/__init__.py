"""The Python conformance kit and runner (``tests/README.md``), and the e-commerce example's
Python handlers (``examples/ecommerce/python/handlers.py``)."""

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

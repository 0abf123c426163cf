"""The Python conformance kit and runner (``tests/README.md``), and the e-commerce example's
Python handlers loaded from ``examples/ecommerce/python``."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

REPO_DIR = Path(__file__).resolve().parents[3]
ECOMMERCE_DIR = REPO_DIR / "examples" / "ecommerce"


def ecommerce_handlers() -> ModuleType:
    """``examples/ecommerce/python/handlers.py`` as a module (imported once)."""
    name = "tasker_examples_ecommerce_handlers"
    module = sys.modules.get(name)
    if module is None:
        path = ECOMMERCE_DIR / "python" / "handlers.py"
        spec = importlib.util.spec_from_file_location(name, path)
        if spec is None or spec.loader is None:
            raise ImportError(f"cannot load {path}")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return module

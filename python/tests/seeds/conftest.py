"""The seeds' tests import their handlers as ``handlers.ecommerce``, a top-level name other
parts of the suite may give to other modules. While a test module of this directory is
imported, ``handlers`` is the package here; afterwards whatever it was before comes back, so
neither side sees the other's module."""

import sys
from pathlib import Path
from types import ModuleType

import pytest

_HERE = str(Path(__file__).parent)
_saved: dict[str, ModuleType] = {}


def _ours(name: str) -> bool:
    return name == "handlers" or name.startswith("handlers.")


def pytest_collectstart(collector: pytest.Collector) -> None:
    if isinstance(collector, pytest.Module):
        for name in [n for n in sys.modules if _ours(n)]:
            _saved[name] = sys.modules.pop(name)
        sys.path.insert(0, _HERE)


def pytest_collectreport(report: pytest.CollectReport) -> None:
    if report.nodeid.endswith(".py") and _HERE in sys.path:
        sys.path.remove(_HERE)
        for name in [n for n in sys.modules if _ours(n)]:
            del sys.modules[name]
        sys.modules.update(_saved)
        _saved.clear()

"""Handler resolution (SPEC §12): explicit registration first, then the callable as an
import path (``package.module.Class`` or ``package.module.function``)."""

from __future__ import annotations

import importlib
import inspect
import threading
from collections.abc import Callable
from typing import Any, TypeAlias

from tasker_core.step_handler import StepHandler
from tasker_core.step_handler.functional import handler_for

__all__ = ["HandlerRegistry", "HandlerSpec"]

HandlerSpec: TypeAlias = type[StepHandler] | StepHandler | Callable[..., Any]


class HandlerRegistry:
    """Callable name -> handler instance (or function). Thread-safe."""

    def __init__(self) -> None:
        self._handlers: dict[str, Any] = {}
        self._lock = threading.Lock()

    def register(self, handler: HandlerSpec, name: str | None = None) -> list[str]:
        """Registers a handler class, instance or function (a decorated functional handler
        runs with its declared inputs and dependencies); returns the callables it now serves
        (its name, and its import path for classes and functions)."""
        instance: Any
        names: list[str | None]
        if inspect.isclass(handler):
            if not issubclass(handler, StepHandler):
                raise TypeError(f"{handler.__qualname__} is not a StepHandler subclass")
            instance = handler()
            names = [name or handler.registered_name(), _import_path(handler)]
        elif isinstance(handler, StepHandler):
            instance = handler
            names = [name or type(handler).registered_name(), _import_path(type(handler))]
        elif (functional := handler_for(handler)) is not None:
            instance = functional
            names = [name or functional.registered_name(), _import_path(handler)]
        elif callable(handler):
            instance = handler
            declared = getattr(handler, "handler_name", None)
            names = [name or declared or getattr(handler, "__name__", "")]
            if hasattr(handler, "__module__") and hasattr(handler, "__qualname__"):
                names.append(_import_path(handler))
        else:
            raise TypeError(f"cannot register {handler!r} as a handler")
        served = [n for n in dict.fromkeys(names) if n]
        if not served:
            raise ValueError(f"{handler!r} has no name: pass name=")
        with self._lock:
            for n in served:
                self._handlers[n] = instance
        return served

    def get(self, callable_name: str) -> Any | None:
        with self._lock:
            return self._handlers.get(callable_name)

    def names(self) -> list[str]:
        with self._lock:
            return sorted(self._handlers)

    def resolve(self, callable_name: str) -> Any | None:
        """The registered handler, else the callable imported as a path (then registered
        under it); ``None`` when neither works."""
        found = self.get(callable_name)
        if found is not None:
            return found
        target = _import(callable_name)
        if target is None:
            return None
        if inspect.isclass(target) and issubclass(target, StepHandler):
            instance: Any = target()
        elif (functional := handler_for(target)) is not None:
            instance = functional
        elif callable(target) and not inspect.isclass(target):
            instance = target
        else:
            return None
        with self._lock:
            return self._handlers.setdefault(callable_name, instance)


def _import_path(obj: Any) -> str:
    return f"{obj.__module__}.{obj.__qualname__}"


def _import(path: str) -> Any | None:
    """``a.b.C`` -> attribute ``C`` of module ``a.b`` (or nested attributes); ``None`` when
    nothing of that name can be imported."""
    parts = path.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        try:
            obj: Any = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        try:
            for attr in parts[cut:]:
                obj = getattr(obj, attr)
        except AttributeError:
            return None
        return obj
    return None

"""Functional handlers (SPEC §12): a function declares what it receives, the decorators
deliver it.

    @step_handler("process_payment")
    @depends_on(cart=("validate_cart", CartResult))
    @inputs(OrderInput)
    def process_payment(cart: CartResult, inputs: OrderInput, context: StepContext):
        return {"amount_charged": cart.total, "token": inputs.payment_token}

- ``@inputs(Model)`` validates the task context into the Pydantic model ``Model`` and passes
  it as the parameter ``inputs``; ``@inputs("a", "b")`` passes the context fields ``a`` and
  ``b`` as the parameters of those names (``None`` when absent).
- ``@depends_on(param=("step", Model))`` validates the result of the ancestor ``step`` into
  ``Model``; ``@depends_on(param="step")`` passes the result as it is (``None`` when the
  step has no result).
- A parameter named ``context`` receives the :class:`StepContext`.
- A value that fails validation fails the step permanently (``validation_error``), naming
  every violation.
- The function returns a dict (the result), a Pydantic model (dumped to JSON), ``None``
  (``{}``) or a :class:`StepHandlerResult`; it may be ``async def``; a raised
  ``PermanentError`` / ``RetryableError`` fails the step as a class handler's would.

The decorated function stays callable as written (unit tests pass it models directly);
``Tasker(handlers=[fn])`` / ``register_handler(fn)`` register it under its handler name and
its import path, and a template's ``callable`` may name either.
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar, overload

import pydantic

from tasker_core.context import StepContext
from tasker_core.step_handler import StepHandler
from tasker_core.types import ErrorType, StepHandlerResult

__all__ = ["FunctionalHandler", "depends_on", "handler_for", "inputs", "step_handler"]

F = TypeVar("F", bound=Callable[..., Any])

# The attribute of a decorated function holding its declarations.
_SPEC = "__tasker_spec__"


@dataclass
class _Spec:
    """What the decorators declared for one function."""

    name: str | None = None
    version: str = "1.0.0"
    inputs_model: type[pydantic.BaseModel] | None = None
    input_keys: list[str] = field(default_factory=list)
    # parameter -> (step name, model or None for the raw result)
    dependencies: dict[str, tuple[str, type[pydantic.BaseModel] | None]] = field(
        default_factory=dict
    )
    handler_class: type[FunctionalHandler] | None = None
    handler: FunctionalHandler | None = None


def _spec(fn: Callable[..., Any]) -> _Spec:
    spec = getattr(fn, _SPEC, None)
    if spec is None:
        spec = _Spec()
        setattr(fn, _SPEC, spec)
    return spec


def _parameters(fn: Callable[..., Any]) -> tuple[dict[str, inspect.Parameter], bool]:
    """The parameters ``fn`` can take by keyword, and whether it takes ``**kwargs``."""
    params = inspect.signature(fn).parameters
    by_name = {
        n: p
        for n, p in params.items()
        if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    }
    return by_name, any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def _require_parameter(fn: Callable[..., Any], name: str, decorator: str) -> None:
    by_name, var_kw = _parameters(fn)
    if name not in by_name and not var_kw:
        raise TypeError(
            f"{decorator} delivers the parameter {name!r}, but "
            f"{fn.__qualname__}{inspect.signature(fn)} has no such parameter"
        )


def _is_model(obj: object) -> bool:
    return inspect.isclass(obj) and issubclass(obj, pydantic.BaseModel)


def inputs(*keys_or_model: str | type[pydantic.BaseModel]) -> Callable[[F], F]:
    """Declares what the function receives from the task context: one Pydantic model
    (validated from the whole context, passed as ``inputs``) or field names (each passed as
    the parameter of that name)."""
    if len(keys_or_model) == 1 and _is_model(keys_or_model[0]):
        model: Any = keys_or_model[0]
        keys: list[str] = []
    elif keys_or_model and all(isinstance(k, str) and k for k in keys_or_model):
        model, keys = None, [str(k) for k in keys_or_model]
    else:
        raise TypeError(
            "@inputs takes one Pydantic model class or one or more field names, "
            f"got {keys_or_model!r}"
        )

    def decorate(fn: F) -> F:
        spec = _spec(fn)
        if model is not None:
            _require_parameter(fn, "inputs", f"@inputs({model.__name__})")
            spec.inputs_model = model
        for key in keys:
            _require_parameter(fn, key, f"@inputs({key!r})")
            if key not in spec.input_keys:
                spec.input_keys.append(key)
        return fn

    return decorate


def depends_on(
    **dependencies: str | tuple[str, type[pydantic.BaseModel]],
) -> Callable[[F], F]:
    """Declares ancestor results the function receives: ``param="step"`` passes the step's
    result as it is; ``param=("step", Model)`` validates it into the Pydantic ``Model``."""
    declared: dict[str, tuple[str, type[pydantic.BaseModel] | None]] = {}
    for param, target in dependencies.items():
        if isinstance(target, str) and target:
            declared[param] = (target, None)
        elif (
            isinstance(target, tuple)
            and len(target) == 2
            and isinstance(target[0], str)
            and target[0]
            and _is_model(target[1])
        ):
            declared[param] = (target[0], target[1])
        else:
            raise TypeError(
                f'@depends_on({param}=...) takes a step name or ("step", PydanticModel), '
                f"got {target!r}"
            )

    def decorate(fn: F) -> F:
        for param in declared:
            _require_parameter(fn, param, f"@depends_on({param}=...)")
        _spec(fn).dependencies.update(declared)
        return fn

    return decorate


@overload
def step_handler(name: F, /) -> F: ...


@overload
def step_handler(name: str | None = None, *, version: str = "1.0.0") -> Callable[[F], F]: ...


def step_handler(name: str | Callable[..., Any] | None = None, *, version: str = "1.0.0") -> Any:
    """Makes a function a step handler named ``name`` (default: the function's name).
    ``@step_handler`` and ``@step_handler("name")`` both work."""
    if callable(name):
        return step_handler()(name)
    if name is not None and (not isinstance(name, str) or not name):
        raise TypeError(f"@step_handler takes a handler name, got {name!r}")

    def decorate(fn: F) -> F:
        if not callable(fn) or inspect.isclass(fn):
            raise TypeError(f"@step_handler decorates a function, got {fn!r}")
        spec = _spec(fn)
        spec.name = name or fn.__name__
        spec.version = version
        spec.handler_class = None
        spec.handler = None
        fn.handler_name = spec.name  # type: ignore[attr-defined]
        fn.handler_version = version  # type: ignore[attr-defined]
        fn._handler_class = _handler_class(fn)  # type: ignore[attr-defined]
        return fn

    return decorate


def handler_for(obj: object) -> FunctionalHandler | None:
    """The handler serving a decorated function (``None`` for anything else)."""
    spec = getattr(obj, _SPEC, None)
    if not isinstance(spec, _Spec) or not callable(obj):
        return None
    if spec.handler is None:
        spec.handler = _handler_class(obj)()
    return spec.handler


class FunctionalHandler(StepHandler):
    """The :class:`StepHandler` a decorated function runs as (one subclass per function,
    also reachable as ``fn._handler_class``)."""

    function: Callable[..., Any]

    def call(self, context: StepContext) -> StepHandlerResult | Awaitable[StepHandlerResult]:
        fn = type(self).function
        prepared = _arguments(fn, context)
        if isinstance(prepared, StepHandlerResult):
            return prepared
        if inspect.iscoroutinefunction(fn):
            return _finish_async(fn, fn(**prepared))
        return _as_result(fn, fn(**prepared))


async def _finish_async(fn: Callable[..., Any], pending: Awaitable[Any]) -> StepHandlerResult:
    return _as_result(fn, await pending)


def _handler_class(fn: Callable[..., Any]) -> type[FunctionalHandler]:
    spec = _spec(fn)
    if spec.handler_class is None:
        spec.handler_class = type(
            getattr(fn, "__name__", "functional_handler"),
            (FunctionalHandler,),
            {
                "handler_name": spec.name or getattr(fn, "__name__", ""),
                "handler_version": spec.version,
                "function": staticmethod(fn),
                "__module__": getattr(fn, "__module__", __name__),
                "__qualname__": getattr(fn, "__qualname__", "functional_handler"),
                "__doc__": fn.__doc__,
            },
        )
    return spec.handler_class


def _arguments(fn: Callable[..., Any], context: StepContext) -> dict[str, Any] | StepHandlerResult:
    """The keyword arguments for one call, or the validation failure that stops it."""
    spec = _spec(fn)
    by_name, var_kw = _parameters(fn)
    kwargs: dict[str, Any] = {}
    violations: list[dict[str, Any]] = []

    if spec.inputs_model is not None:
        _validate(spec.inputs_model, context.input_data, "inputs", None, kwargs, violations)
    for key in spec.input_keys:
        value = context.get_input(key)
        if value is not None or not _has_default(by_name.get(key)):
            kwargs[key] = value
    for param, (step, model) in spec.dependencies.items():
        result = context.get_dependency_result(step)
        if result is None and _has_default(by_name.get(param)):
            continue
        if model is None:
            kwargs[param] = result
        else:
            _validate(model, result, param, step, kwargs, violations)
    if "context" in by_name or var_kw:
        kwargs.setdefault("context", context)

    if violations:
        summary = "; ".join(f"{v['field']}: {v['message']}" for v in violations)
        return StepHandlerResult.failure(
            f"{_label(fn)}: invalid {_sources(violations)}: {summary}",
            error_type=ErrorType.VALIDATION_ERROR,
            retryable=False,
            metadata={"violations": violations},
        )
    missing = [
        n for n, p in by_name.items() if n not in kwargs and p.default is inspect.Parameter.empty
    ]
    if missing:
        return StepHandlerResult.failure(
            f"{_label(fn)}: nothing supplies the parameter(s) {', '.join(missing)} "
            "(declare them with @inputs or @depends_on, or name one `context`)",
            error_type=ErrorType.HANDLER_ERROR,
            retryable=False,
        )
    return kwargs


def _validate(
    model: type[pydantic.BaseModel],
    value: Any,
    param: str,
    step: str | None,
    kwargs: dict[str, Any],
    violations: list[dict[str, Any]],
) -> None:
    source = "inputs" if step is None else f"{param} (step {step})"
    if value is None and step is not None:
        violations.append(
            {
                "source": source,
                "field": source,
                "message": f"step {step!r} has no result (it is not a completed ancestor)",
                "type": "missing_dependency",
            }
        )
        return
    try:
        kwargs[param] = model.model_validate(value)
    except pydantic.ValidationError as exc:
        for error in exc.errors(include_url=False):
            loc = ".".join(str(part) for part in error["loc"])
            violations.append(
                {
                    "source": source,
                    "field": f"{source}.{loc}" if loc else source,
                    "message": error["msg"],
                    "type": error["type"],
                }
            )


def _has_default(param: inspect.Parameter | None) -> bool:
    return param is not None and param.default is not inspect.Parameter.empty


def _sources(violations: list[dict[str, Any]]) -> str:
    return ", ".join(dict.fromkeys(v["source"] for v in violations))


def _label(fn: Callable[..., Any]) -> str:
    spec = _spec(fn)
    return spec.name or str(getattr(fn, "__qualname__", repr(fn)))


def _as_result(fn: Callable[..., Any], value: Any) -> StepHandlerResult:
    """What the function returned as a step result."""
    if isinstance(value, StepHandlerResult):
        return value
    if value is None:
        return StepHandlerResult.success(result={})
    if isinstance(value, pydantic.BaseModel):
        return StepHandlerResult.success(result=value.model_dump(mode="json"))
    if isinstance(value, Mapping):
        return StepHandlerResult.success(result=dict(value))
    return StepHandlerResult.failure(
        f"{_label(fn)} returned {type(value).__name__}: return a dict, a Pydantic model or a "
        "StepHandlerResult",
        error_type=ErrorType.INVALID_RESULT,
        retryable=False,
    )

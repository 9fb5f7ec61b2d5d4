"""Typed payloads: a handler's ``model=``, checked at registration and applied to each record once.

``@app.handler(topic, model=Transfer)`` takes one of:

- a pydantic v2 model (a ``pydantic.BaseModel`` subclass, ``RootModel``
  included) or a pydantic dataclass: validated by pydantic from the JSON
  bytes (``model_validate_json``), with the model's own settings (strict or
  lax, extra fields, validators). Needs the ``exactlyonce[pydantic]`` extra;
- a plain dataclass (no extra needed): the value is decoded as JSON and each
  field checked *strictly* against its annotation by the small checker
  below. Supported annotations: ``str``, ``int``, ``float`` (an integer is
  accepted), ``bool``, ``None``, ``Any``, ``Literal[...]`` of those
  scalars, ``Enum`` subclasses (by value), ``list[X]``, ``tuple[X, ...]``,
  ``tuple[X, Y]``, ``dict[str, X]``, unions (``X | None``) and nested
  dataclasses. No conversion: ``"5"`` is not an ``int``. A missing field
  without a default is an error; keys that are not fields are ignored (as
  pydantic does by default). Any other annotation is refused at
  registration: use a pydantic model for dates, decimals, UUIDs and the like.

A value that is not JSON (or is null) raises
:class:`~exactlyonce.errors.MessageDecodeError` (``undecodable-value``); JSON
that does not validate raises :class:`~exactlyonce.errors.InvalidPayload`
(``invalid-payload``), whose text names each failing field and why, at most
:data:`MAX_ERRORS` of them, and never the values they had.
"""

from __future__ import annotations

import dataclasses
import enum
import importlib
import inspect
import threading
import types
import typing
from collections.abc import Callable
from typing import Any, cast

from exactlyonce.errors import ConfigurationError, InvalidPayload, MessageDecodeError
from exactlyonce.message import Message, with_payload

__all__ = ["EXTRA", "MAX_ERRORS", "check_model", "check_path", "typed", "validator"]

#: The extra that installs pydantic.
EXTRA = "exactlyonce[pydantic]"

#: Validation errors named in an ``invalid-payload`` message (the others are counted).
MAX_ERRORS = 10

#: Characters kept of each error's text.
MAX_ERROR_CHARS = 200

#: ``validate(message) -> payload``.
Validate = Callable[[Message], Any]

#: Each model's validator, built at its first registration (a model is a class: they live as long as the process).
_validators: dict[type, Validate] = {}
_lock = threading.Lock()


def check_model(model: Any) -> None:
    """Refuse, with a :class:`ConfigurationError`, a ``model=`` that cannot validate records."""
    validator(model)


def validator(model: Any) -> Validate:
    """The validate function of ``model`` (built once per model, then reused)."""
    if not isinstance(model, type):
        raise ConfigurationError(
            f"model= takes a class (a pydantic model or a dataclass), not {type(model).__name__} "
            f"{_short(repr(model))}"
        )
    with _lock:
        found = _validators.get(model)
    if found is None:
        found = _build(model)
        with _lock:
            _validators[model] = found
    return found


def typed(model: type, message: Message) -> Message:
    """``message`` with its ``payload``: the value validated into ``model``.

    Raises :class:`MessageDecodeError` when the value is null or not JSON,
    :class:`InvalidPayload` when it does not validate.
    """
    return with_payload(message, validator(model)(message))


def check_path(model: type, path: str) -> None:
    """Refuse a dotted ``path`` (``ids.field``) whose names are not fields of ``model`` (as far as it can tell).

    Each step into a nested model or dataclass is checked; a step into
    anything else (a dict, ``Any``) ends the check.
    """
    node: Any = model
    for part in path.split("."):
        fields = _field_types(node)
        if fields is None:
            return
        if part not in fields:
            raise ConfigurationError(
                f"ids.field({path!r}): {node.__qualname__} has no field {part!r} "
                f"(its fields: {', '.join(sorted(fields)) or 'none'})"
            )
        node = _without_none(fields[part])


# -- building a validator -----------------------------------------------------


def _build(model: type) -> Validate:
    if _is_from_pydantic(model) or _is_pydantic_dataclass(model):
        pydantic = _import_pydantic(model)
        if issubclass(model, pydantic.BaseModel):
            return _pydantic_validator(model, cast(Any, model).model_validate_json, pydantic)
        if _is_pydantic_dataclass(model):
            return _pydantic_validator(model, pydantic.TypeAdapter(model).validate_json, pydantic)
        raise ConfigurationError(
            f"model={model.__qualname__} is a pydantic class but not a pydantic v2 model: model= takes a "
            "subclass of pydantic.BaseModel (not pydantic.v1's), a pydantic dataclass or a plain dataclass"
        )
    if dataclasses.is_dataclass(model):
        return _dataclass_validator(model)
    raise ConfigurationError(
        f"model={model.__qualname__} is neither a pydantic model nor a dataclass: model= takes a pydantic v2 "
        f"model (the {EXTRA} extra) or a @dataclasses.dataclass class"
    )


def _is_from_pydantic(model: type) -> bool:
    return any(base.__module__ == "pydantic" or base.__module__.startswith("pydantic.") for base in model.__mro__)


def _is_pydantic_dataclass(model: type) -> bool:
    return dataclasses.is_dataclass(model) and hasattr(model, "__pydantic_validator__")


def _import_pydantic(model: type) -> Any:
    try:
        pydantic = importlib.import_module("pydantic")
    except ImportError as exc:
        raise ConfigurationError(
            f"model={model.__qualname__} is a pydantic model, but pydantic cannot be imported ({exc}): "
            f"install the {EXTRA} extra (pip install '{EXTRA}')"
        ) from exc
    version = str(getattr(pydantic, "VERSION", "0"))
    if not version.split(".")[0].isdigit() or int(version.split(".")[0]) < 2:
        raise ConfigurationError(
            f"model={model.__qualname__} needs pydantic 2, and pydantic {version} is installed: "
            f"install the {EXTRA} extra (pip install '{EXTRA}')"
        )
    return pydantic


def _pydantic_validator(model: type, validate_json: Callable[[bytes], Any], pydantic: Any) -> Validate:
    name = model.__qualname__

    def validate(message: Message) -> Any:
        if message.value is None:
            raise MessageDecodeError(f"{message.where()}: value is null, expected JSON")
        try:
            return validate_json(message.value)
        except pydantic.ValidationError as exc:
            errors = exc.errors(include_url=False, include_input=False, include_context=False)
            broken = [error for error in errors if error.get("type") == "json_invalid"]
            if broken:
                raise MessageDecodeError(
                    f"{message.where()}: value is not valid JSON: {_short(str(broken[0].get('msg', '')))}"
                ) from None
            problems = [f"{_loc(error.get('loc', ()))}: {error.get('msg', '')}" for error in errors]
            raise _invalid(name, message, problems) from None
        except Exception as exc:
            # A validator of the model's that raised something pydantic does not
            # wrap: the same value fails the same way every time.
            raise _invalid(name, message, [f"(value): validation raised {type(exc).__name__}: {exc}"]) from exc

    return validate


def _loc(loc: Any) -> str:
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text or "(value)"


def _invalid(name: str, message: Message, problems: list[str]) -> InvalidPayload:
    shown = [_short(problem) for problem in problems[:MAX_ERRORS]]
    more = f"; and {len(problems) - MAX_ERRORS} more" if len(problems) > MAX_ERRORS else ""
    count = f"{len(problems)} error{'s' if len(problems) != 1 else ''}"
    return InvalidPayload(f"{message.where()}: value is not a valid {name} ({count}): {'; '.join(shown)}{more}")


def _short(text: str) -> str:
    return text if len(text) <= MAX_ERROR_CHARS else text[: MAX_ERROR_CHARS - 1] + "…"


# -- plain dataclasses -----------------------------------------------------------

#: What a converter returns for a value that does not fit (the reasons go to ``problems``).
_BAD: Any = object()

#: ``convert(value, loc, problems) -> converted value, or _BAD``.
_Convert = Callable[[Any, str, list[str]], Any]


def _dataclass_validator(model: type) -> Validate:
    convert = _Converters(model).dataclass(model)
    name = model.__qualname__

    def validate(message: Message) -> Any:
        data = message.json()
        problems: list[str] = []
        result = convert(data, "", problems)
        if result is _BAD:
            raise _invalid(name, message, problems)
        return result

    return validate


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "an array",
            dict: "an object"}.get(type(value), type(value).__name__)


def _child(loc: str, name: str) -> str:
    return f"{loc}.{name}" if loc else name


class _Converters:
    """Builds the converters of one model's annotations; refuses an annotation it cannot check."""

    def __init__(self, model: type) -> None:
        self._model = model
        self._dataclasses: dict[type, _Convert] = {}

    def _unsupported(self, where: str, annotation: Any) -> ConfigurationError:
        return ConfigurationError(
            f"model={self._model.__qualname__}: {where} is annotated {annotation!r}, which exactlyonce does not "
            "check for a plain dataclass (it checks str, int, float, bool, None, Any, Literal, Enum, list, "
            f"tuple, dict[str, ...], unions and nested dataclasses); use a pydantic model (the {EXTRA} extra) "
            "for other types"
        )

    def dataclass(self, cls: type) -> _Convert:
        found = self._dataclasses.get(cls)
        if found is not None:
            return found
        spec: list[tuple[str, _Convert, bool]] = []

        def convert(value: Any, loc: str, problems: list[str]) -> Any:
            if not isinstance(value, dict):
                problems.append(f"{loc or '(value)'}: expected an object ({cls.__qualname__}), got {_json_type(value)}")
                return _BAD
            arguments: dict[str, Any] = {}
            ok = True
            for name, field_convert, required in spec:
                where = _child(loc, name)
                if name not in value:
                    if required:
                        problems.append(f"{where}: field required")
                        ok = False
                    continue
                converted = field_convert(value[name], where, problems)
                if converted is _BAD:
                    ok = False
                else:
                    arguments[name] = converted
            if not ok:
                return _BAD
            try:
                return cls(**arguments)
            except Exception as exc:  # its __post_init__ refused the values
                problems.append(f"{loc or '(value)'}: {cls.__qualname__}() raised {type(exc).__name__}: {exc}")
                return _BAD

        self._dataclasses[cls] = convert  # before the fields: a dataclass may nest itself
        try:
            hints = typing.get_type_hints(cls)
        except Exception as exc:
            raise ConfigurationError(
                f"model={self._model.__qualname__}: the annotations of {cls.__qualname__} cannot be resolved "
                f"({type(exc).__name__}: {exc})"
            ) from exc
        init_fields = [f for f in dataclasses.fields(cls) if f.init]
        parameters = set(inspect.signature(cls).parameters)
        extra = parameters - {f.name for f in init_fields}
        if extra:
            raise ConfigurationError(
                f"model={self._model.__qualname__}: {cls.__qualname__} takes init-only parameters "
                f"({', '.join(sorted(extra))}) that are not fields; exactlyonce fills fields only"
            )
        for f in init_fields:
            required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
            spec.append((f.name, self.annotation(hints[f.name], f"{cls.__qualname__}.{f.name}"), required))
        return convert

    def annotation(self, annotation: Any, where: str) -> _Convert:
        if annotation is Any or annotation is object:
            return lambda value, loc, problems: value
        if annotation is None or annotation is type(None):
            return _scalar(lambda v: v is None, "null", lambda v: v)
        if annotation is bool:
            return _scalar(lambda v: isinstance(v, bool), "a boolean", lambda v: v)
        if annotation is int:
            return _scalar(lambda v: isinstance(v, int) and not isinstance(v, bool), "an integer", lambda v: v)
        if annotation is float:
            return _scalar(lambda v: isinstance(v, int | float) and not isinstance(v, bool), "a number", float)
        if annotation is str:
            return _scalar(lambda v: isinstance(v, str), "a string", lambda v: v)
        origin, args = typing.get_origin(annotation), typing.get_args(annotation)
        if origin is typing.Literal:
            return self._literal(annotation, args, where)
        if origin is typing.Union or origin is types.UnionType:
            return _union([self.annotation(arg, where) for arg in args], annotation)
        if annotation is list or origin is list:
            return _list(self.annotation(args[0] if args else Any, where))
        if annotation is tuple or origin is tuple:
            if not args or (len(args) == 2 and args[1] is Ellipsis):
                return _list(self.annotation(args[0] if args else Any, where), tuple)
            if args == ((),):
                return _fixed_tuple([])
            return _fixed_tuple([self.annotation(arg, where) for arg in args])
        if annotation is dict or origin is dict:
            if args and args[0] not in (str, Any):
                raise self._unsupported(where, annotation)
            return _dict(self.annotation(args[1] if args else Any, where))
        if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
            return _enum(annotation)
        if isinstance(annotation, type) and dataclasses.is_dataclass(annotation):
            if _is_pydantic_dataclass(annotation):
                raise self._unsupported(where, annotation)
            return self.dataclass(annotation)
        raise self._unsupported(where, annotation)

    def _literal(self, annotation: Any, args: tuple[Any, ...], where: str) -> _Convert:
        if not all(arg is None or isinstance(arg, str | int | bool) for arg in args):
            raise self._unsupported(where, annotation)
        allowed = ", ".join(repr(arg) for arg in args)

        def convert(value: Any, loc: str, problems: list[str]) -> Any:
            if any(value == arg and type(value) is type(arg) for arg in args):
                return value
            problems.append(f"{loc or '(value)'}: expected one of {allowed}, got {_json_type(value)}")
            return _BAD

        return convert


def _scalar(accepts: Callable[[Any], bool], expected: str, make: Callable[[Any], Any]) -> _Convert:
    def convert(value: Any, loc: str, problems: list[str]) -> Any:
        if accepts(value):
            return make(value)
        problems.append(f"{loc or '(value)'}: expected {expected}, got {_json_type(value)}")
        return _BAD

    return convert


def _union(members: list[_Convert], annotation: Any) -> _Convert:
    def convert(value: Any, loc: str, problems: list[str]) -> Any:
        attempts: list[list[str]] = []
        for member in members:
            scratch: list[str] = []
            converted = member(value, loc, scratch)
            if converted is not _BAD:
                return converted
            attempts.append(scratch)
        nested = [attempt for attempt in attempts if attempt and not attempt[0].startswith(f"{loc or '(value)'}: ")]
        if len(nested) == 1:
            problems.extend(nested[0])  # only one member got past the type check: its reasons are the useful ones
        else:
            problems.append(f"{loc or '(value)'}: expected {_type_name(annotation)}, got {_json_type(value)}")
        return _BAD

    return convert


def _type_name(annotation: Any) -> str:
    return str(annotation).replace("typing.", "")


def _list(item: _Convert, make: Callable[[list[Any]], Any] = list) -> _Convert:
    def convert(value: Any, loc: str, problems: list[str]) -> Any:
        if not isinstance(value, list):
            problems.append(f"{loc or '(value)'}: expected an array, got {_json_type(value)}")
            return _BAD
        items = [item(each, f"{loc}[{index}]", problems) for index, each in enumerate(value)]
        return _BAD if any(each is _BAD for each in items) else make(items)

    return convert


def _fixed_tuple(items: list[_Convert]) -> _Convert:
    def convert(value: Any, loc: str, problems: list[str]) -> Any:
        if not isinstance(value, list) or len(value) != len(items):
            got = f"an array of {len(value)}" if isinstance(value, list) else _json_type(value)
            problems.append(f"{loc or '(value)'}: expected an array of {len(items)}, got {got}")
            return _BAD
        pairs = enumerate(zip(items, value, strict=True))
        converted = [item(each, f"{loc}[{index}]", problems) for index, (item, each) in pairs]
        return _BAD if any(each is _BAD for each in converted) else tuple(converted)

    return convert


def _dict(item: _Convert) -> _Convert:
    def convert(value: Any, loc: str, problems: list[str]) -> Any:
        if not isinstance(value, dict):
            problems.append(f"{loc or '(value)'}: expected an object, got {_json_type(value)}")
            return _BAD
        items = {key: item(each, f"{loc}[{_short(repr(key))[:40]}]", problems) for key, each in value.items()}
        return _BAD if any(each is _BAD for each in items.values()) else items

    return convert


def _enum(cls: type[enum.Enum]) -> _Convert:
    values = [member.value for member in cls]
    shown = ", ".join(repr(v) for v in values[:10]) + (", ..." if len(values) > 10 else "")
    expected = f"expected one of {cls.__qualname__} ({shown})"

    def convert(value: Any, loc: str, problems: list[str]) -> Any:
        if isinstance(value, bool) and not any(isinstance(v, bool) for v in values):
            problems.append(f"{loc or '(value)'}: {expected}, got a boolean")
            return _BAD
        try:
            return cls(value)
        except (ValueError, TypeError):
            problems.append(f"{loc or '(value)'}: {expected}, got {_json_type(value)}")
            return _BAD

    return convert


# -- field names, for ids.field -------------------------------------------------


def _field_types(node: Any) -> dict[str, Any] | None:
    """A model's or dataclass's fields and their annotations; ``None`` for anything else."""
    if not isinstance(node, type):
        return None
    fields = getattr(node, "model_fields", None)
    if isinstance(fields, dict) and _is_from_pydantic(node):
        return {name: getattr(info, "annotation", Any) for name, info in fields.items()}
    if dataclasses.is_dataclass(node):
        try:
            hints = typing.get_type_hints(node)
        except Exception:
            hints = {}
        return {f.name: hints.get(f.name, Any) for f in dataclasses.fields(node)}
    return None


def _without_none(annotation: Any) -> Any:
    """``X`` for ``X | None`` (``Optional[X]``); the annotation itself otherwise."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        rest = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
        if len(rest) == 1:
            return rest[0]
    return annotation

"""The configuration schema, derived from the config dataclasses themselves.

A field's type is its annotation (int, float, str, bool, `X | None`, `tuple[float, float]`,
`list[int]`, `dict[str, float]`, `Literal[...]`); its range or set of allowed values, when it
has one, is a `Rule` given to the `@section` decorator next to the class:

    @section("optim", lr=greater_than(0), warmup_steps=at_least(0))
    @dataclass(kw_only=True)
    class OptimConfig: ...

A new field is type-checked with no further edit; a range is one keyword more. Floats must be
finite everywhere (a NaN learning rate or clip would run on silently). Values from a flag, a
JSON/TOML file or the Python API meet the same check, `validate()`, which raises one-line
ConfigErrors naming the key, the value and what is allowed.

Standard library only, and nothing of the project: config.py imports this module alone.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import types
import typing
from dataclasses import dataclass
from typing import Any, Callable


class ConfigError(ValueError):
    """Bad user input. The CLI prints it as one line and exits with code 2."""


# -- rules -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Rule:
    """A range or a set of allowed values: `ok(value)` and the words for what is allowed."""

    ok: Callable[[Any], bool]
    allowed: str
    noun: str | None = None  # enums of names: "unknown <noun> 'x'; choose from ..."


def at_least(lo) -> Rule:
    return Rule(lambda v: v >= lo, f">= {lo}")


def greater_than(lo) -> Rule:
    return Rule(lambda v: v > lo, f"> {lo}")


def between(lo, hi, *, low_open: bool = False, high_open: bool = False) -> Rule:
    """lo <= v <= hi, either end open on request: between(0, 1, low_open=True) is (0, 1]."""
    def ok(v):
        return (v > lo if low_open else v >= lo) and (v < hi if high_open else v <= hi)
    return Rule(ok, f"in {'(' if low_open else '['}{lo}, {hi}{')' if high_open else ']'}")


def one_of(*values, noun: str | None = None) -> Rule:
    """An enum. `noun` words the error for names ("unknown preset 'x'; choose from ...")."""
    shown = [str(v) for v in values]
    words = shown[0] if len(shown) == 1 else ", ".join(shown[:-1]) + " or " + shown[-1]
    return Rule(lambda v: v in values, words, noun)


def each(rule: Rule) -> Rule:
    """A rule for every item of a tuple or list field (e.g. Adam's betas, each in [0, 1))."""
    return Rule(lambda v: all(rule.ok(x) for x in v), f"{rule.allowed} each")


# -- types -----------------------------------------------------------------------------------
def _describe(tp) -> str:
    """The annotation `tp` in words, for error messages."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is type(None):
        return "null"
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in args)
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a list of {_describe(args[0])}"
        if len(set(args)) == 1:
            return f"a list of {len(args)} items, each {_describe(args[0])}"
        return f"a list of {len(args)} ({', '.join(_describe(a) for a in args)})"
    if origin is list:
        return f"a list of {_describe(args[0])}" if args else "a list"
    if origin is dict or tp is dict:
        return "a table"
    return {int: "an integer", float: "a finite number", str: "a string", bool: "true or false"}.get(
        tp, getattr(tp, "__name__", str(tp)))


def _convert(value, tp):
    """`value` as the annotation `tp` asks, or raise TypeError. The conversions are the ones a
    JSON/TOML file needs and no more: int -> float, list -> tuple. bool is never an int."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return value
    if tp is type(None):
        if value is None:
            return None
    elif origin in (typing.Union, types.UnionType):
        for arm in sorted(args, key=lambda a: a is not type(None)):  # None first: never coerced
            try:
                return _convert(value, arm)
            except TypeError:
                pass
    elif origin is typing.Literal:
        if value in args:
            return value
    elif origin is tuple:
        if isinstance(value, (list, tuple)):
            items = args[:1] * len(value) if len(args) == 2 and args[1] is Ellipsis else args
            if len(items) == len(value):
                return tuple(_convert(v, t) for v, t in zip(value, items))
    elif origin is list:
        if isinstance(value, (list, tuple)):
            return [_convert(v, args[0]) for v in value] if args else list(value)
    elif origin is dict or tp is dict:
        if isinstance(value, dict):
            if len(args) == 2:
                return {_convert(k, args[0]): _convert(v, args[1]) for k, v in value.items()}
            return dict(value)
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            return float(value)
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif isinstance(tp, type):
        if isinstance(value, tp):
            return value
    else:
        return value  # an annotation this schema does not know: no check rather than a wrong one
    raise TypeError(_describe(tp))


def _shown(value) -> str:
    return repr(value) if isinstance(value, str) else str(value)


# -- sections --------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def convert_field(cls, name: str, value, key: str):
    """`value` for field `name` of `cls` (from a file or a flag), converted as its annotation
    says; a wrong type is one ConfigError naming `key`."""
    try:
        return _convert(value, _hints(cls)[name])
    except TypeError as e:
        raise ConfigError(f"{key} must be {e}, got {_shown(value)} ({type(value).__name__})") from None


def check_fields(obj, prefix: str, rules: dict[str, Rule]) -> None:
    """Every field of the dataclass `obj` against its annotation, then its rule."""
    for f in dataclasses.fields(obj):
        key, value = f"{prefix}.{f.name}", getattr(obj, f.name)
        convert_field(type(obj), f.name, value, key)
        rule = rules.get(f.name)
        if rule is not None and value is not None:
            check_value(key, value, rule)


def check_value(key: str, value, rule: Rule) -> None:
    """One value against its rule (also for rules whose allowed values live outside the
    config, e.g. the pipeline schedules the C++ generator knows: parallel/validate.py)."""
    if not rule.ok(value):
        if rule.noun:
            raise ConfigError(f"unknown {rule.noun} {_shown(value)} ({key}); choose from {rule.allowed}")
        raise ConfigError(f"{key} must be {rule.allowed}, got {_shown(value)}")


def section(name: str, **rules: Rule):
    """Class decorator for a config dataclass: names its section and gives ranges / enums by
    field. Its `validate()` then checks every field's type and rule first, then runs the
    class's own cross-field checks (if it defines `validate`)."""
    def wrap(cls):
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(rules) - fields)
        if unknown:  # a typo in the table must not silently check nothing
            raise TypeError(f"{cls.__name__}: rules for unknown field(s) {', '.join(unknown)}")
        own = cls.__dict__.get("validate")

        def validate(self) -> None:
            check_fields(self, name, rules)
            if own is not None:
                own(self)

        validate.__doc__ = own.__doc__ if own is not None else f"Check the [{name}] section."
        cls.validate = validate
        cls.SECTION, cls.RULES = name, dict(rules)
        return cls
    return wrap


def from_table(cls, values, key: str):
    """A section dataclass from a file's table: not a table, an unknown key or a wrong type
    is one ConfigError naming the key."""
    if not isinstance(values, dict):
        raise ConfigError(f"config section '{key}' must be a table/object, got {_shown(values)}")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ConfigError(f"unknown key(s) in [{key}]: {', '.join(unknown)}; "
                          f"allowed: {', '.join(sorted(names))}")
    return cls(**{k: convert_field(cls, k, v, f"{key}.{k}") for k, v in values.items()})


def flag_type(cls, name: str) -> Callable[[str], Any] | None:
    """The argparse `type` for a flag setting field `name`: the scalar inside its annotation
    (`int | None` -> int); None for bool fields (store_true flags) or non-scalars."""
    tp = _hints(cls)[name]
    arms = [a for a in typing.get_args(tp) if a is not type(None)] or [tp]
    scalar = arms[0] if len(arms) == 1 else None
    return scalar if scalar in (int, float, str) else None


@functools.lru_cache(maxsize=None)
def field_docs(cls) -> dict[str, str]:
    """{field: its docstring, whitespace folded}: the string literal under each annotated field
    (read from the source, where Python keeps them). The CLI's help text is these, so a setting
    is explained in one place."""
    import ast
    import inspect
    import textwrap

    node = ast.parse(textwrap.dedent(inspect.getsource(cls))).body[0]
    docs = {}
    for a, b in zip(node.body, node.body[1:]):
        if (isinstance(a, ast.AnnAssign) and isinstance(a.target, ast.Name) and isinstance(b, ast.Expr)
                and isinstance(b.value, ast.Constant) and isinstance(b.value.value, str)):
            docs[a.target.id] = " ".join(b.value.value.split())
    return docs


def field_help(cls, name: str) -> str:
    """A field's docstring, then what is allowed (its enum) and its default unless the
    docstring says either, for a command-line flag (argparse's % escaped)."""
    doc = field_docs(cls).get(name, "")
    rule = getattr(cls, "RULES", {}).get(name)
    if rule is not None and rule.noun:
        doc += f" One of {rule.allowed}."
    default = next(f.default for f in dataclasses.fields(cls) if f.name == name)
    if default not in (None, dataclasses.MISSING) and "default" not in doc.lower():
        doc += f" Default: {default}."
    return doc.replace("%", "%%")

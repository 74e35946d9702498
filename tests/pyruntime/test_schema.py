"""The schema comes from the config dataclasses: a new field is type-checked with no rule
written for it, a range is one keyword, and the same check runs on a file's value and on
the Python API's."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import pytest

from pyruntime.config import ModelConfig
from pyruntime.schema import ConfigError, at_least, between, from_table, one_of, section


@section("demo", count=at_least(1), mode=one_of("a", "b"), ratio=between(0, 1, low_open=True))
@dataclass(kw_only=True)
class Demo:
    count: int = 1
    mode: str = "a"
    ratio: float = 0.5
    window: int | None = None  # no rule: its type alone is checked
    pair: tuple[float, float] = (0.0, 1.0)
    names: list[str] | None = None
    table: dict[str, float] | None = None
    kind: Literal["x", "y"] = "x"
    flag: bool = False

    def validate(self):
        if self.window is not None and self.window > 100:
            raise ConfigError("demo.window must be <= 100 (a relation the class checks itself)")


@pytest.mark.parametrize("fields,message", [
    ({"count": 0}, "demo.count must be >= 1, got 0"),
    ({"count": True}, "demo.count must be an integer, got True"),
    ({"mode": "c"}, "demo.mode must be a or b, got 'c'"),
    ({"ratio": 0.0}, "demo.ratio must be in (0, 1], got 0.0"),
    ({"ratio": math.nan}, "demo.ratio must be a finite number, got nan"),
    ({"window": "8"}, "demo.window must be an integer or null, got '8'"),
    ({"window": 1000}, "demo.window must be <= 100"),
    ({"pair": (1.0,)}, "demo.pair must be a list of 2 items, each a finite number"),
    ({"names": ["a", 1]}, "demo.names must be a list of a string or null"),
    ({"table": {"a": "x"}}, "demo.table must be a table or null"),
    ({"kind": "z"}, "demo.kind must be one of 'x', 'y'"),
    ({"flag": 1}, "demo.flag must be true or false, got 1"),
])
def test_python_api_values_meet_the_schema(fields, message):
    with pytest.raises(ConfigError) as info:
        Demo(**fields).validate()
    assert message in str(info.value) and "\n" not in str(info.value)


def test_file_values_are_converted_as_the_annotation_says():
    d = from_table(Demo, {"ratio": 1, "pair": [0.5, 2], "window": None, "names": ["a"]}, "demo")
    assert d.ratio == 1.0 and isinstance(d.ratio, float) and d.pair == (0.5, 2.0)
    with pytest.raises(ConfigError, match=r"unknown key\(s\) in \[demo\]: cnt; allowed: "):
        from_table(Demo, {"cnt": 1}, "demo")
    with pytest.raises(ConfigError, match="demo.count must be an integer, got '3' \\(str\\)"):
        from_table(Demo, {"count": "3"}, "demo")


def test_a_rule_for_a_field_that_does_not_exist_fails_at_import():
    with pytest.raises(TypeError, match="rules for unknown field"):
        @section("typo", cuont=at_least(1))
        @dataclass
        class Typo:
            count: int = 1


def test_every_model_field_is_checked_by_type():
    """Whatever fields ModelConfig gains, a string in place of its value is refused."""
    for name, value in vars(ModelConfig()).items():
        if isinstance(value, str) or name == "rope_scaling":
            continue
        with pytest.raises(ConfigError, match=f"model.{name} must be"):
            ModelConfig(**{name: "wrong"}).validate()

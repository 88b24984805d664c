"""The extension points without DeepSpeed: registries, option strings, plugins, and settings
dataclasses that declare their own flags."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import pytest

from ngdiff_ds.errors import ConfigError
from ngdiff_ds.registry import NoOptions, Registry, load_plugin, parse_option_strings
from ngdiff_ds.settings import add_arguments, from_args, invalid, option


@dataclass(frozen=True)
class Knobs:
    beta: float = 0.1
    steps: int = 3
    strict: bool = False
    name: str = "x"
    cap: float | None = None


def _registry():
    registry = Registry("test method", "--method")

    @registry.register("plain")
    def plain(value):
        return value

    @registry.register("knobs", Knobs)
    def with_knobs(value, options):
        return value * options.beta

    return registry


def test_option_strings_are_converted_to_the_field_types():
    options = parse_option_strings(_registry(), "knobs", ["beta=0.5", "steps=7", "strict=true",
                                                           "name=abc", "cap=2.5"], "--opt")
    assert options == Knobs(beta=0.5, steps=7, strict=True, name="abc", cap=2.5)
    assert parse_option_strings(_registry(), "knobs", ["cap=none"], "--opt").cap is None
    assert parse_option_strings(_registry(), "knobs", [], "--opt") == Knobs()


@pytest.mark.parametrize("pairs,needles", [
    (["gamma=1"], ["--opt", "gamma", "beta, cap, name, steps, strict"]),
    (["beta=abc"], ["--opt 'beta=abc'", "float"]),
    (["steps=1.5"], ["steps=1.5", "int"]),
    (["strict=maybe"], ["strict=maybe", "bool"]),
    (["beta"], ["KEY=VALUE"]),
])
def test_bad_option_strings_name_the_flag(pairs, needles):
    with pytest.raises(ConfigError) as error:
        parse_option_strings(_registry(), "knobs", pairs, "--opt")
    for needle in needles:
        assert needle in str(error.value)


def test_bind_fixes_the_options_once():
    registry = _registry()
    assert registry.bind("plain")(3) == 3
    assert registry.bind("knobs")(2.0) == pytest.approx(0.2)
    assert registry.bind("knobs", Knobs(beta=4.0))(2.0) == 8.0
    with pytest.raises(TypeError):
        registry.bind("knobs", NoOptions())
    with pytest.raises(ConfigError, match="'nope' is not a known test method; known: knobs, plain"):
        registry.bind("nope")
    with pytest.raises(ValueError, match="twice"):
        registry.register("plain")(lambda value: value)


def test_plugins_with_the_same_file_name_in_two_folders_both_load(tmp_path):
    from ngdiff_ds.losses import FORGET_LOSSES

    for folder, name in (("a", "plugin_loss_a"), ("b", "plugin_loss_b")):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "losses.py").write_text(
            "from ngdiff_ds.losses import FORGET_LOSSES\n"
            f"@FORGET_LOSSES.register({name!r})\n"
            "def loss(logits, batch):\n    return logits.sum()\n")
        load_plugin(str(tmp_path / folder / "losses.py"))
        load_plugin(str(tmp_path / folder / "losses.py"))  # a second load is a no-op
    assert "plugin_loss_a" in FORGET_LOSSES and "plugin_loss_b" in FORGET_LOSSES
    with pytest.raises(ConfigError, match="no such file"):
        load_plugin(str(tmp_path / "missing.py"))
    with pytest.raises(ConfigError, match="no module named"):
        load_plugin("no_such_plugin_module")


@dataclass
class Example:
    count: int = option(2, help="how many")
    rate: float | None = option(None, flag="--learning-rate", help="a rate")
    enabled: bool = option(True, flag="--no-example", help="turn it off")
    sizes: tuple[int, ...] = option((1, 2), help="sizes")
    hidden: int = 5  # not a flag

    def __post_init__(self):
        if self.count < 1:
            invalid(self, "count", "must be at least 1")


def test_settings_declare_and_parse_their_own_flags():
    parser = argparse.ArgumentParser()
    add_arguments(parser, Example, "example")
    assert from_args(Example, parser.parse_args([])) == Example()
    parsed = from_args(Example, parser.parse_args(
        ["--count", "4", "--learning-rate", "0.5", "--no-example", "--sizes", "3", "4", "5"]),
        hidden=9)
    assert parsed == Example(count=4, rate=0.5, enabled=False, sizes=(3, 4, 5), hidden=9)
    with pytest.raises(ConfigError, match=r"--count must be at least 1, got 0"):
        from_args(Example, parser.parse_args(["--count", "0"]))

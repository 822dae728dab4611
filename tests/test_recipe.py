"""Recipe parsing: every error names its field path and the valid choices."""

import pytest

from compress.errors import UsageError
from compress.recipe import load_recipe, parse_recipe

GOOD = {"passes": [{"pass": "quantize", "format": "int4", "group_size": 64}]}


def test_bundled_recipes_parse():
    from compress.recipe import BUNDLED

    paths = sorted(BUNDLED.glob("*.yaml"))
    assert paths, "no bundled recipes"
    for path in paths:
        assert load_recipe(path).passes


def test_defaults_and_round_trip():
    recipe = parse_recipe(GOOD)
    assert recipe.calibration.source == "stdlib" and recipe.passes[0].group_size == 64
    import yaml

    assert parse_recipe(yaml.safe_load(recipe.to_yaml())) == recipe


@pytest.mark.parametrize("data, expected", [
    ({"passes": [{"pass": "quantise"}]}, "unknown pass 'quantise'; valid passes: quantize"),
    ({"passes": [{"pass": "quantize", "group_sise": 64}]},
     "passes[0].group_sise: unknown field; valid fields here: pass, format, group_size"),
    ({"passes": [{"pass": "quantize", "group_size": "big"}]}, "passes[0].group_size"),
    ({"passes": [{"pass": "quantize", "format": "int3"}]}, "passes[0].format"),
    ({"passes": []}, "passes: List should have at least 1 item"),
    ({"passes": [{"format": "int4"}]}, "needs a 'pass:' key"),
    ({"calibration": {"samples": 0}, **GOOD}, "calibration.samples"),
    ({"calibration": {"sample": 8}, **GOOD}, "calibration.sample: unknown field; valid fields "
                                              "here: source, samples"),
    ([1, 2], "a recipe is a mapping"),
])
def test_errors_name_the_field(data, expected):
    with pytest.raises(UsageError) as info:
        parse_recipe(data)
    assert expected in str(info.value)
    assert "\n" not in str(info.value)
    assert info.value.exit_code == 2


def test_python_tags_are_refused(tmp_path):
    path = tmp_path / "evil.yaml"
    path.write_text("passes: !!python/object/apply:os.system ['echo hacked']\n")
    with pytest.raises(UsageError, match="not valid YAML"):
        load_recipe(path)


def test_missing_recipe_lists_bundled():
    with pytest.raises(UsageError, match="bundled recipes: .*int4-rtn"):
        load_recipe("no-such-recipe.yaml")


def test_a_pass_name_registered_twice_is_refused():
    from typing import Literal

    from pydantic import Field

    from compress.passes.base import PassConfig, register

    class AnotherQuantize(PassConfig):
        kind: Literal["quantize"] = Field("quantize", alias="pass")

    with pytest.raises(TypeError, match="registered twice"):
        register(AnotherQuantize)


def test_every_ordering_rule_is_declared_on_its_pass():
    """The rules live in class attributes checked by the base class: each declared pair is
    refused in the wrong order and accepted in the right one."""
    from compress.passes import PASS_CONFIGS

    examples = {"quantize": {"pass": "quantize", "format": "int4"},
                "sparsify": {"pass": "sparsify"}}
    checked = 0
    for config in PASS_CONFIGS:
        for later in config.comes_before:
            first = {"pass": config.model_fields["kind"].default}
            if first["pass"] == "prune_heads":
                first["fraction"] = 0.25
            parse_recipe({"passes": [first, examples[later]]})
            with pytest.raises(UsageError, match=f"must .* before {later}"):
                parse_recipe({"passes": [examples[later], first]})
            checked += 1
    assert checked >= 5

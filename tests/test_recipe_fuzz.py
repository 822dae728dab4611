"""Fuzz the recipe parser: any input gives a parsed recipe or a clean UsageError, never a crash."""

from hypothesis import given, settings
from hypothesis import strategies as st

from compress.errors import UsageError
from compress.recipe import parse_recipe

scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6),
                    st.floats(allow_nan=True), st.text(max_size=12))
keys = st.sampled_from(["pass", "passes", "calibration", "format", "group_size", "symmetric",
                        "method", "ignore", "targets", "samples", "seq_len", "source", "seed",
                        "quantize", "int4", "nvfp4", "x"])
values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(keys, inner, max_size=5)), max_leaves=20)
pass_like = st.fixed_dictionaries({"pass": st.sampled_from(["quantize", "bogus"])},
                                  optional={k: values for k in ["format", "group_size",
                                                                "symmetric", "method", "ignore"]})
recipes = st.one_of(values, st.fixed_dictionaries(
    {"passes": st.lists(st.one_of(pass_like, values), max_size=3)},
    optional={"calibration": st.dictionaries(keys, values, max_size=4)}))


@settings(max_examples=300, deadline=None)
@given(recipes)
def test_any_structure_parses_or_fails_cleanly(data):
    try:
        recipe = parse_recipe(data)
    except UsageError as exc:
        message = str(exc)
        assert message and "\n" not in message and exc.exit_code == 2
    else:
        assert recipe.passes


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=200))
def test_any_yaml_text_parses_or_fails_cleanly(tmp_path_factory, text):
    from compress.recipe import load_recipe

    path = tmp_path_factory.mktemp("fuzz") / "r.yaml"
    path.write_text(text)
    try:
        load_recipe(path)
    except UsageError as exc:
        assert "\n" not in str(exc)

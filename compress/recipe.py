"""Recipes: YAML read with safe_load into pydantic models that reject what they don't know.

    calibration: {source: stdlib, samples: 128, seq_len: 512, seed: 0}
    passes:
      - pass: quantize
        format: int4
        group_size: 64
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from compress.calib import CalibrationConfig
from compress.errors import UsageError
from compress.passes import PASS_CONFIGS

PassSpec = Annotated[Union[PASS_CONFIGS], Field(discriminator="kind")]


class Recipe(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    calibration: CalibrationConfig = CalibrationConfig()
    passes: list[PassSpec] = Field(min_length=1)

    @model_validator(mode="after")
    def _check_order(self) -> "Recipe":
        first: dict[str, int] = {}
        for index, cfg in enumerate(self.passes):
            if cfg.kind in first:
                raise ValueError(f"passes[{index}] ({cfg.kind}): {cfg.kind} appears twice: the "
                                 f"recipe already has a {cfg.kind} pass at "
                                 f"passes[{first[cfg.kind]}]; merge them into one (quantize "
                                 "takes overrides for per-module settings)")
            first[cfg.kind] = index
        for index, cfg in enumerate(self.passes):
            problem = cfg.order_error(index, list(self.passes))
            if problem:
                raise ValueError(f"passes[{index}] ({cfg.kind}): {problem}")
        return self

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json", by_alias=True), sort_keys=False)


def _location(loc: tuple) -> str:
    parts = []
    for item in loc:
        if isinstance(item, int):
            parts.append(f"[{item}]")
        elif item in {c.model_fields["kind"].default for c in PASS_CONFIGS}:
            continue  # pydantic names the union member; the index already says which pass
        else:
            parts.append(("." if parts else "") + str(item))
    return "".join(parts) or "recipe"


def _valid_fields(loc: tuple) -> list[str]:
    """Field names allowed where an unknown field was found (walks the schema along loc)."""
    by_kind = {c.model_fields["kind"].default: c for c in PASS_CONFIGS}
    model: Any = Recipe
    for item in loc[:-1]:
        if isinstance(item, int):
            continue
        if item in by_kind:
            model = by_kind[item]
        elif model is not None and item in getattr(model, "model_fields", {}):
            annotation = model.model_fields[item].annotation
            model = annotation if isinstance(annotation, type) and issubclass(
                annotation, BaseModel) else None
    if model is None:
        return []
    return [f.alias or name for name, f in model.model_fields.items()]


def describe(error: ValidationError) -> str:
    """The first validation error as one line: where, what, and the valid choices."""
    first = error.errors()[0]
    where = _location(first["loc"])
    if first["type"] == "extra_forbidden":
        return (f"{where}: unknown field; valid fields here: "
                f"{', '.join(_valid_fields(first['loc']))}")
    if first["type"] == "union_tag_invalid":
        kinds = ", ".join(c.model_fields["kind"].default for c in PASS_CONFIGS)
        tag = first.get("ctx", {}).get("tag")
        return f"{where}: unknown pass {tag!r}; valid passes: {kinds}"
    if first["type"] == "union_tag_not_found":
        return f"{where}: each pass needs a 'pass:' key naming it"
    message = first["msg"].removeprefix("Value error, ")
    return f"{where}: {message}"


def parse_recipe(data: Any, origin: str = "recipe") -> Recipe:
    if not isinstance(data, dict):
        raise UsageError(f"{origin}: a recipe is a mapping with 'passes' (and optional "
                         "'calibration'), not " + type(data).__name__)
    try:
        return Recipe.model_validate(data)
    except ValidationError as exc:
        raise UsageError(f"{origin}: {describe(exc)}") from None


MAX_RECIPE_BYTES = 1 << 20  # a recipe is a few lines; anything larger is a mistake or an attack


def load_recipe(path: str | Path, allow_paths: tuple[Path, ...] | list[Path] = ()) -> Recipe:
    """Read and validate a recipe file (before any model is loaded). Its calibration text must
    lie below the current directory, the recipe's directory or one of allow_paths."""
    path = Path(path)
    if not path.is_file():
        bundled = BUNDLED / f"{path}.yaml"
        if bundled.is_file():
            path = bundled
        else:
            raise UsageError(f"recipe {str(path)!r} not found; bundled recipes: "
                             f"{', '.join(sorted(p.stem for p in BUNDLED.glob('*.yaml')))}")
    with open(path, "rb") as handle:
        raw = handle.read(MAX_RECIPE_BYTES + 1)
    if len(raw) > MAX_RECIPE_BYTES:
        raise UsageError(f"{path}: a recipe may be at most {MAX_RECIPE_BYTES >> 20} MB; this one "
                         "is larger")
    try:
        data = yaml.safe_load(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise UsageError(f"{path}: not a text file (a recipe is UTF-8 YAML)") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise UsageError(f"{path}: not valid YAML{where}: {problem}") from None
    recipe = parse_recipe(data, str(path))
    from compress.calib import check_text_source

    check_text_source(recipe.calibration.source, (path.resolve().parent, *allow_paths),
                      f"{path}: calibration.source")
    return recipe


# Inside the package, so a wheel carries them (the top-level recipes/ is a link to them).
BUNDLED = Path(__file__).resolve().parent / "bundled" / "recipes"

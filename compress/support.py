"""What each pass supports, read from the code (`python -m compress.support` prints the README's
table): the pass configs' Literal fields (methods, formats), their class variables, and for the
passes that need a family's layout, which Arch table rows they accept (PassConfig.family_problem).
"""

from __future__ import annotations

import typing


def choices(cfg_class) -> list[str]:
    """`field: a, b, c` for every field of a pass config whose type is a Literal, and its
    on/off fields."""
    found = []
    for name, field in cfg_class.model_fields.items():
        args = typing.get_args(field.annotation)
        literals = [a for a in args if isinstance(a, str)] if typing.get_origin(
            field.annotation) is typing.Literal else []
        if not literals:  # Optional[Literal[...]]
            literals = [x for a in args if typing.get_origin(a) is typing.Literal
                        for x in typing.get_args(a)]
        if literals and name != "kind":
            found.append(f"{name}: {', '.join(literals)}")
    switches = [n for n, f in cfg_class.model_fields.items() if f.annotation is bool]
    return found + ([f"on/off: {', '.join(switches)}"] if switches else [])


def families(cfg_class) -> str:
    from compress.models import ARCHES

    if not cfg_class.needs_family:
        return ("any model transformers loads (table rows and others; MoE experts, fused 3D "
                "or per-expert, included)")
    accepted = [name for name, arch in sorted(ARCHES.items())
                if cfg_class.family_problem(arch) is None]
    return "table rows only: " + ", ".join(accepted)


def table() -> str:
    from compress.passes import PASS_CONFIGS

    lines = ["| pass | options | model families | streams, resumes | exact |",
             "|---|---|---|---|---|"]
    for cfg_class in PASS_CONFIGS:
        kind = cfg_class.model_fields["kind"].default
        lines.append(f"| {kind} | {'; '.join(choices(cfg_class))} | {families(cfg_class)} | "
                     f"{'yes' if cfg_class.layerwise else 'no'} | "
                     f"{'yes' if cfg_class.exact else 'no'} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(table())

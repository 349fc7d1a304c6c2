""":class:`~tasks.config.RunConfig` as the DAG's trigger form (Airflow ``Param``s) and as CLI flags.

Both come from the fields' own metadata (title, description, bounds, choices, form section), so a
parameter is declared once and the form, the flags and the validation never disagree.
"""

from __future__ import annotations

from typing import Any, Literal

from tasks.config import RunConfig


def _json_type(prop: dict[str, Any]) -> tuple[dict[str, Any], bool]:
    """A field's JSON schema without pydantic's ``anyOf`` for optionals: (schema, nullable)."""
    options = prop.get("anyOf")
    if not options:
        return {k: v for k, v in prop.items() if k not in ("default", "title", "description")}, False
    kinds = [o for o in options if o.get("type") != "null"]
    return dict(kinds[0]), len(kinds) < len(options)


def dag_params(defaults: dict[str, Any] | None = None) -> dict[str, Any]:
    """The DAG's trigger form: an Airflow ``Param`` per :class:`RunConfig` field (title, description,
    bounds, enum, section) from the model's own JSON schema; ``defaults`` overrides field defaults."""
    from airflow.sdk import Param

    schema = RunConfig.model_json_schema()["properties"]
    params = {}
    for name, field in RunConfig.model_fields.items():
        prop = dict(schema[name])
        extra = {k: prop.pop(k) for k in ("section", "values_display") if k in prop}
        kind, nullable = _json_type(prop)
        if nullable:
            kind["type"] = ["null", kind["type"]]
            if "enum" in kind:
                kind["enum"] = [None, *kind["enum"]]
        default = (defaults or {}).get(name, field.get_default(call_default_factory=True))
        params[name] = Param(default, title=field.title, description=field.description, **kind, **extra)
    return params


def flag_type(kind: type, bounds: dict[str, Any]) -> Any:
    """An argparse ``type`` that parses ``kind`` and checks a field's ge/gt/le bounds (one-line errors)."""
    import argparse
    import operator

    checks = {"ge": (operator.ge, ">="), "gt": (operator.gt, ">"), "le": (operator.le, "<=")}

    def parse(text: str) -> Any:
        shown = {k: str(v) if isinstance(v, int) else f"{v:g}" for k, v in bounds.items()}
        if "ge" in shown and "le" in shown:
            rule = f"between {shown['ge']} and {shown['le']}"
        else:
            rule = " and ".join(f"{checks[k][1]} {v}" for k, v in shown.items())
        what = f"{'an integer' if kind is int else 'a number'}{' ' + rule if rule else ''}"
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}") from None
        if not all(checks[k][0](value, v) for k, v in bounds.items()):
            raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}")
        return value

    parse.__name__ = kind.__name__
    return parse


def add_run_flags(parser: Any, names: tuple[str, ...]) -> None:
    """argparse flags for :class:`RunConfig` fields (``--batch-size`` for ``batch_size``), with the
    field's bounds and choices checked while the arguments are parsed; unset flags stay None."""
    import types
    import typing

    for name in names:
        field = RunConfig.model_fields[name]
        flag, help_text = "--" + name.replace("_", "-"), field.description or field.title
        kind: Any = field.annotation
        if typing.get_origin(kind) in (typing.Union, types.UnionType):
            kind = next(a for a in typing.get_args(kind) if a is not type(None))
        if kind is bool:
            parser.add_argument(f"--no-{name.replace('_', '-')}", dest=name, action="store_const", const=False,
                                help=f"off: {help_text}")
        elif typing.get_origin(kind) is Literal:
            choices = typing.get_args(kind)  # "{a | b,c}": a choice may hold a comma (backbone,decoder)
            parser.add_argument(flag, dest=name, choices=choices, metavar="{" + " | ".join(choices) + "}",
                                help=help_text)
        elif kind in (int, float):
            bounds = {k: getattr(m, k) for m in field.metadata for k in ("ge", "gt", "le")
                      if getattr(m, k, None) is not None}
            parser.add_argument(flag, dest=name, type=flag_type(kind, bounds), help=help_text)
        else:
            parser.add_argument(flag, dest=name, help=help_text)

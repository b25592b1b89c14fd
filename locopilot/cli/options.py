"""Command-line flags generated from a msgspec Struct's fields (``locopilot train``, ``locopilot
jobs submit``: :class:`~locopilot.training.hyperparameters.Hyperparameters` and what extends it).

A flag's value is checked by its field's own type (``msgspec.convert``, lax, so ``"3"`` is 3),
so its limits are the schema's and cannot drift from the API's or the job file's; a value out
of range is a click usage error that quotes msgspec's reason. The help is the field's
description with the values allowed and the default.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

import msgspec
import msgspec.inspect as mi
import rich_click as click

F = TypeVar("F", bound=Callable[..., Any])


def _number(value: float) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _range(ge: float | None, gt: float | None, le: float | None, lt: float | None) -> str:
    """``1…100``, ``>0…0.01``, ``0…<0.5``."""
    low = _number(ge) if ge is not None else (f">{_number(gt)}" if gt is not None else "")
    high = _number(le) if le is not None else (f"<{_number(lt)}" if lt is not None else "")
    return f"{low}…{high}"


def _shown(info: mi.Type) -> tuple[str, str]:
    """(the values a type allows, as a metavar; its description)."""
    match info:
        case mi.Metadata(type=inner, extra_json_schema=schema):
            shown, _ = _shown(inner)
            return shown, str((schema or {}).get("description", ""))
        case mi.UnionType(types=types):
            parts = [_shown(t) for t in types if not isinstance(t, mi.NoneType)]
            return "|".join(p[0] for p in parts), " ".join(p[1] for p in parts if p[1])
        case mi.LiteralType(values=values):
            return "|".join(str(v) for v in values), ""
        case mi.IntType(ge=ge, gt=gt, le=le, lt=lt, multiple_of=step):
            return _range(ge, gt, le, lt) + (f", step {step}" if step else ""), ""
        case mi.FloatType(ge=ge, gt=gt, le=le, lt=lt):
            return _range(ge, gt, le, lt), ""
        case mi.StrType():
            return "TEXT", ""
    return "VALUE", ""


class FieldType(click.ParamType[Any]):
    """A flag's value as its field's type takes it; ``fail`` with msgspec's reason otherwise."""

    def __init__(self, name: str, annotation: Any, metavar: str) -> None:
        self.name = name
        self.annotation = annotation
        self.metavar = metavar

    def get_metavar(self, param: click.Parameter, ctx: click.Context) -> str:
        return self.metavar

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if not isinstance(value, str):
            return value  # a default, already of the field's type
        try:
            return msgspec.convert(value, self.annotation, strict=False)
        except msgspec.ValidationError as exc:
            self.fail(f"{exc} (allowed: {self.metavar})", param, ctx)


def struct_options(
    struct: type[msgspec.Struct],
    *,
    only: Sequence[str] | None = None,
    aliases: Mapping[str, Sequence[str]] | None = None,
    notes: Mapping[str, str] | None = None,
) -> Callable[[F], F]:
    """A decorator adding one option per field of ``struct`` (``only`` these, in this order):
    ``--field-name`` (``--name/--no-name`` for a bool), default the field's, help its
    description and ``notes[name]``."""
    info = mi.type_info(struct)
    assert isinstance(info, mi.StructType)
    by_name = {f.name: f for f in msgspec.structs.fields(struct)}
    described = {f.name: f for f in info.fields}
    names = list(only) if only is not None else [f.name for f in info.fields]

    def option(name: str) -> Callable[[F], F]:
        field, inspected = by_name[name], described[name]
        flag = "--" + name.replace("_", "-")
        metavar, description = _shown(inspected.type)
        text = " ".join(t for t in (description, (notes or {}).get(name, "")) if t)
        default = None if field.default is msgspec.NODEFAULT else field.default
        if isinstance(inspected.type, mi.BoolType) or (
            isinstance(inspected.type, mi.Metadata) and isinstance(inspected.type.type, mi.BoolType)
        ):
            return click.option(f"{flag}/--no-{flag[2:]}", name, default=default, show_default=True, help=text)
        return click.option(
            flag,
            *(aliases or {}).get(name, ()),
            name,
            type=FieldType(name, field.type, metavar),
            default=default,
            show_default=default is not None,
            help=text,
        )

    def decorate(function: F) -> F:
        for name in reversed(names):
            function = option(name)(function)
        return function

    return decorate


def struct_table(struct: type[msgspec.Struct]) -> str:
    """``struct``'s fields as a Markdown table (the README's hyperparameters), as the flags show them."""
    info = mi.type_info(struct)
    assert isinstance(info, mi.StructType)
    lines = ["| field (flag) | allowed | default | what it does |", "|---|---|---|---|"]
    for field in info.fields:
        allowed, description = _shown(field.type)
        default = "" if field.default is msgspec.NODEFAULT else field.default
        shown = "(none)" if default is None else f"`{default}`"
        flag = "--" + field.name.replace("_", "-")
        allowed = allowed.replace("|", " \\| ")
        lines.append(f"| `{field.name}` (`{flag}`) | {allowed} | {shown} | {description} |")
    return "\n".join(lines) + "\n"


README_START = "<!-- hyperparameters:start -->\n"
README_END = "<!-- hyperparameters:end -->"


def with_hyperparameters_table(readme: str) -> str:
    """``readme`` with the text between the hyperparameters markers replaced by the table of
    :class:`~locopilot.training.hyperparameters.Hyperparameters`."""
    from locopilot.training.hyperparameters import Hyperparameters

    head, _, rest = readme.partition(README_START)
    _, _, tail = rest.partition(README_END)
    return head + README_START + struct_table(Hyperparameters) + README_END + tail

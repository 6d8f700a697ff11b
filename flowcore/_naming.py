"""Run-name templates: `{date}`, `{time}`, `{pipeline_name}`, `{run_id}` and user substitutions.

A template is checked twice: its syntax where it enters (`with_options(run_name=...)`, the
decorator, a YAML file), and its placeholders when the run is named, since substitutions may
arrive later. Both happen before a run is recorded.
"""

from __future__ import annotations

import functools
import string
from collections.abc import Mapping
from datetime import datetime

from flowcore.exceptions import ConfigError

__all__ = ["DEFAULT_RUN_NAME", "check_run_name", "format_run_name", "run_name_problem"]

DEFAULT_RUN_NAME = "{pipeline_name}-{date}-{time}"
BUILTIN_PLACEHOLDERS = ("date", "time", "pipeline_name", "run_id")


@functools.lru_cache(maxsize=256)
def _fields(template: str) -> tuple[str, ...]:
    """The placeholder names of a template; ValueError for anything but plain `{name}`.
    (Cached: a service names a run per request, nearly always from the same template.)"""
    names = []
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise ValueError(f"{exc} ({'{{'} and {'}}'} are literal braces)") from None
    for _, field, spec, conversion in parsed:
        if field is None:
            continue
        if conversion is not None:
            raise ValueError(f"placeholder '{{{field}!{conversion}}}' has a conversion")
        if spec:
            raise ValueError(f"placeholder '{{{field}:{spec}}}' has a format spec")
        if not field.isidentifier():
            shown = f"{{{field}}}"
            raise ValueError(f"placeholder '{shown}' is not a plain name")
        names.append(field)
    return tuple(names)


def run_name_problem(template: str) -> str | None:
    """What is wrong with a run-name template's syntax, or None if nothing is."""
    try:
        _fields(template)
    except ValueError as exc:
        return f"run name '{template}' is not a valid template: {exc}"
    return None


def check_run_name(template: str, where: str) -> None:
    """Raise ConfigError (prefixed with `where`) if a run-name template's syntax is invalid."""
    problem = run_name_problem(template)
    if problem is not None:
        raise ConfigError(f"{where}: {problem}")


def format_run_name(
    template: str,
    *,
    pipeline_name: str,
    run_id: str,
    now: datetime,
    substitutions: Mapping[str, str] | None = None,
) -> str:
    """Fill a run-name template; `now` must be UTC.

    Raises:
        ConfigError: the template is not valid (a lone brace, a format spec, a conversion) or
            names a placeholder nobody provides.
    """
    try:
        fields = _fields(template)
    except ValueError as exc:
        raise ConfigError(f"pipeline '{pipeline_name}': run name '{template}' is not a valid "
                          f"template: {exc}") from None
    values: dict[str, str] = {"pipeline_name": pipeline_name, "run_id": run_id}
    # Formatted only when used (strftime is most of the cost of naming a run).
    if "date" in fields:
        values["date"] = f"{now.year:04d}_{now.month:02d}_{now.day:02d}"
    if "time" in fields:
        values["time"] = (f"{now.hour:02d}_{now.minute:02d}_{now.second:02d}_"
                          f"{now.microsecond:06d}")
    if substitutions:
        values.update({str(k): str(v) for k, v in substitutions.items()})
    where = f"pipeline '{pipeline_name}'"
    for field in fields:
        if field not in values and field not in BUILTIN_PLACEHOLDERS:
            known = ", ".join(sorted({*BUILTIN_PLACEHOLDERS, *values}))
            raise ConfigError(
                f"run name '{template}' of {where} uses placeholder "
                f"'{{{field}}}', which is not one of: {known}; add it with "
                "with_options(substitutions={...})"
            )
    return template.format(**values)

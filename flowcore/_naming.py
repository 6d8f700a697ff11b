"""Run-name templates: `{date}`, `{time}`, `{pipeline_name}`, `{run_id}` and user substitutions."""

from __future__ import annotations

import string
from collections.abc import Mapping
from datetime import datetime

from flowcore.exceptions import ConfigError

__all__ = ["DEFAULT_RUN_NAME", "format_run_name"]

DEFAULT_RUN_NAME = "{pipeline_name}-{date}-{time}"


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
        ConfigError: the template names a placeholder nobody provides.
    """
    values: dict[str, str] = {
        "date": now.strftime("%Y_%m_%d"),
        "time": now.strftime("%H_%M_%S_%f"),
        "pipeline_name": pipeline_name,
        "run_id": run_id,
    }
    if substitutions:
        values.update({k: str(v) for k, v in substitutions.items()})
    for _, field_name, _, _ in string.Formatter().parse(template):
        if field_name is not None and field_name not in values:
            known = ", ".join(sorted(values))
            raise ConfigError(
                f"run name '{template}' of pipeline '{pipeline_name}' uses placeholder "
                f"'{{{field_name}}}', which is not one of: {known}; add it with "
                "with_options(substitutions={...})"
            )
    return template.format(**values)

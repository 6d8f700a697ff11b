"""The commands that read and change the store: `flowcore runs list|show|logs|delete|report`
and `flowcore cache clear`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from flowcore._models import PipelineRun, StepStatus
from flowcore._report import ordered_steps
from flowcore._runview import format_duration, status_style
from flowcore.cli._output import (
    _counts_text,
    _err,
    _error_summary,
    _local,
    _Out,
    _print_json,
    _run_duration,
    _run_json,
    _step_time,
)
from flowcore.exceptions import RunNotFoundError, UsageError


def _client() -> Any:
    from flowcore.client import Client

    return Client()


def _get_run(name_or_id: str) -> PipelineRun:
    try:
        run: PipelineRun = _client().get_pipeline_run(name_or_id)
    except RunNotFoundError:
        raise UsageError(f"no run named '{name_or_id}' (see 'flowcore runs list')") from None
    return run


def cmd_runs_list(args: argparse.Namespace) -> int:
    runs: list[PipelineRun] = _client().list_pipeline_runs(
        pipeline_name=args.pipeline, status=args.status, limit=args.limit)
    if args.json:
        _print_json([_run_json(r, steps=False) for r in runs])
        return 0
    out = _Out(sys.stdout)
    if not runs:
        what = " of pipeline " + repr(args.pipeline) if args.pipeline else ""
        out.line(f"No runs{what}{' with status ' + args.status if args.status else ''}.")
        return 0
    rows = [[r.name, r.pipeline_name, r.status.value, _local(r.start_time),
             format_duration(_run_duration(r)), _counts_text(r)] for r in runs]
    out.table(["run", "pipeline", "status", "started", "duration", "steps"], rows, status_col=2)
    return 0


def cmd_runs_show(args: argparse.Namespace) -> int:
    run = _get_run(args.run)
    if args.json:
        _print_json(_run_json(run, steps=True))
        return 0
    out = _Out(sys.stdout)
    out.facts([
        ("run", run.name), ("pipeline", run.pipeline_name), ("status", run.status.value),
        ("started", _local(run.start_time)), ("ended", _local(run.end_time)),
        ("duration", format_duration(_run_duration(run))), ("steps", _counts_text(run)),
    ], styles={"status": status_style(run.status.value)})
    out.line()
    rows = [[s.name, s.status.value, str(s.attempts), _step_time(s),
             "yes" if s.status is StepStatus.CACHED else "no", _error_summary(s)]
            for s in ordered_steps(run)]
    out.table(["step", "status", "attempts", "duration", "cached", "error"], rows,
              status_col=1)
    return 0


def cmd_runs_logs(args: argparse.Namespace) -> int:
    run = _get_run(args.run)
    if args.step not in run.steps:
        raise UsageError(f"run '{run.name}' has no step '{args.step}' "
                         f"(steps: {', '.join(run.steps) or 'none'})")
    text: str = _client().get_step_logs(run.id, args.step)
    if args.json:
        _print_json({"run": run.name, "step": args.step, "logs": text})
        return 0
    if text:
        sys.stdout.write(text if text.endswith("\n") else text + "\n")
    else:
        _err(f"step '{args.step}' of run '{run.name}' printed and logged nothing")
    return 0


def cmd_runs_delete(args: argparse.Namespace) -> int:
    run = _get_run(args.run)
    if not args.yes and sys.stdin.isatty():
        answer = input(f"Delete run '{run.name}' and its {len(run.steps)} step runs? [y/N] ")
        if answer.strip().lower() not in ("y", "yes"):
            _err("nothing deleted")
            return 1
    _client().delete_pipeline_run(run.id)
    sys.stdout.write(f"deleted run {run.name}\n")
    return 0


def cmd_runs_report(args: argparse.Namespace) -> int:
    from flowcore._report import write_report

    run = _get_run(args.run)
    path = Path(args.output) if args.output else Path(f"{run.name}.html")
    try:
        written = write_report(run, path)
    except OSError as exc:
        raise UsageError(f"cannot write the report to '{path}': {exc.strerror or exc}") from None
    sys.stdout.write(f"wrote {written}\n")
    return 0


def cmd_cache_clear(args: argparse.Namespace) -> int:
    n: int = _client().clear_cache(args.pipeline)
    if args.json:
        _print_json({"cleared": n, "pipeline": args.pipeline})
        return 0
    where = f" of pipeline '{args.pipeline}'" if args.pipeline else ""
    sys.stdout.write(f"cleared {n} cache entr{'y' if n == 1 else 'ies'}{where}\n")
    return 0

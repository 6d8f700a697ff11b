"""The commands that act on a run from any process: `flowcore runs cancel RUN [--drain]` and
`flowcore runs resume RUN [--pipeline MODULE:NAME]` (API.md §14-15)."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from flowcore._models import PipelineRun, RunStatus
from flowcore.cli._run import load_pipeline, run_and_report
from flowcore.cli._runs import _client, _get_run
from flowcore.exceptions import UsageError


def cmd_runs_cancel(args: argparse.Namespace) -> int:
    run = _get_run(args.run)
    before = run.status
    status: RunStatus = _client().cancel_run(run.id, drain=args.drain)
    if before.is_finished:
        sys.stdout.write(f"run {run.name} {status.value} (already finished; nothing changed)\n")
    elif status is RunStatus.RUNNING:
        sys.stdout.write(f"run {run.name} running (asked to stop; it has not finished yet)\n")
    else:
        sys.stdout.write(f"run {run.name} {status.value}\n")
    return 0


def pipeline_of(run: PipelineRun, target: str | None) -> Any:
    """The pipeline to resume `run` with: `target` (MODULE:NAME) if given, else the one the run
    recorded (`PipelineRun.source`), imported with the current directory importable."""
    if target is None:
        source = run.source
        if not source:
            raise UsageError(f"run '{run.name}' did not record where its pipeline is defined; "
                             "pass --pipeline MODULE:NAME")
        module, _, qualname = source.partition(":")
        if module == "__main__" or "<locals>" in qualname:
            raise UsageError(f"run '{run.name}' ran pipeline '{qualname}' from "
                             f"{'a script run directly' if module == '__main__' else 'a function'}"
                             ", which cannot be imported again; pass --pipeline MODULE:NAME")
        target = source
    return load_pipeline(target)


def cmd_runs_resume(args: argparse.Namespace) -> int:
    run = _get_run(args.run)
    pipe = pipeline_of(run, args.pipeline)
    if args.verbose:
        from flowcore import enable_console_logging

        enable_console_logging()
    return run_and_report(pipe.with_options(resume_from=run.id), {}, quiet=args.quiet,
                          as_json=args.json)

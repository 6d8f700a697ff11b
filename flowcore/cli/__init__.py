"""The `flowcore` command: list, inspect, delete and report runs; clear the cache; start a run.

    flowcore runs list [--pipeline P] [--status S] [--limit N] [--json]
    flowcore runs show RUN [--json]
    flowcore runs logs RUN STEP [--json]
    flowcore runs delete RUN [--yes]
    flowcore runs report RUN [-o run.html]
    flowcore runs cancel RUN [--drain]
    flowcore runs resume RUN [--pipeline MODULE:NAME] [--json]
    flowcore cache clear [--pipeline P] [--json]
    flowcore run module:pipeline [--config run.yaml] [--param k=v ...] [--json]

It reads the same store as the library (`$FLOWCORE_HOME`, or `$FLOWCORE_STACK`). Tables are
drawn with rich on a terminal and as plain text elsewhere; `--json` is for scripts. Exit
codes: 0 success, 1 a failed run (or a store error), 2 a usage error (unknown run, step or
module, bad parameter), 130 interrupted.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from typing import NoReturn

from flowcore._models import RunStatus
from flowcore.cli._control import cmd_runs_cancel, cmd_runs_resume
from flowcore.cli._output import PROG, _err
from flowcore.cli._run import cmd_run
from flowcore.cli._run import load_pipeline as load_pipeline
from flowcore.cli._run import parse_params as parse_params
from flowcore.cli._runs import (
    cmd_cache_clear,
    cmd_runs_delete,
    cmd_runs_list,
    cmd_runs_logs,
    cmd_runs_report,
    cmd_runs_show,
)
from flowcore.exceptions import FlowcoreError, RunNotFoundError, UsageError

__all__ = ["UsageError", "main"]


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{PROG}: error: {message} (see '{self.prog} --help')\n")


def _build_parser() -> _Parser:
    from flowcore import __version__

    parser = _Parser(prog=PROG, description="Inspect flowcore runs and start pipelines from "
                     "the shell. Reads the store under $FLOWCORE_HOME (default ./.flowcore).")
    parser.add_argument("--version", action="version", version=f"flowcore {__version__}")
    top = parser.add_subparsers(dest="command", metavar="COMMAND")

    runs = top.add_parser("runs", help="list, show, delete, report, cancel and resume runs")
    runs_sub = runs.add_subparsers(dest="runs_command", metavar="COMMAND")

    p = runs_sub.add_parser("list", help="list runs, newest first")
    p.add_argument("-p", "--pipeline", help="only runs of this pipeline")
    p.add_argument("-s", "--status", choices=[s.value for s in RunStatus],
                   help="only runs with this status")
    p.add_argument("-n", "--limit", type=int, default=20, help="at most this many (default 20)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_runs_list)

    p = runs_sub.add_parser("show", help="a run's steps: status, attempts, duration, errors")
    p.add_argument("run", metavar="RUN", help="run name or id")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_runs_show)

    p = runs_sub.add_parser("logs", help="what one step of a run printed and logged")
    p.add_argument("run", metavar="RUN", help="run name or id")
    p.add_argument("step", metavar="STEP", help="invocation ID of the step")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_runs_logs)

    p = runs_sub.add_parser("delete", help="delete a run and its step runs")
    p.add_argument("run", metavar="RUN", help="run name or id")
    p.add_argument("-y", "--yes", action="store_true", help="do not ask for confirmation")
    p.set_defaults(func=cmd_runs_delete)

    p = runs_sub.add_parser("report", help="write a self-contained HTML report of a run")
    p.add_argument("run", metavar="RUN", help="run name or id")
    p.add_argument("-o", "--output", metavar="FILE", help="where to write (default RUN.html)")
    p.set_defaults(func=cmd_runs_report)

    p = runs_sub.add_parser("cancel", help="stop a run, from any process sharing the store")
    p.add_argument("run", metavar="RUN", help="run name or id")
    p.add_argument("--drain", action="store_true",
                   help="let running steps finish (nothing new starts)")
    p.set_defaults(func=cmd_runs_cancel)

    p = runs_sub.add_parser("resume", help="run a failed, stopped or crashed run again, "
                            "reusing the steps that finished")
    p.add_argument("run", metavar="RUN", help="run name or id")
    p.add_argument("--pipeline", metavar="MODULE:NAME",
                   help="the pipeline to run (default: where the run recorded it)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress display")
    p.add_argument("-v", "--verbose", action="store_true", help="also print flowcore's log events")
    p.add_argument("--json", action="store_true", help="print the new run as JSON")
    p.set_defaults(func=cmd_runs_resume)

    cache = top.add_parser("cache", help="manage the step cache")
    cache_sub = cache.add_subparsers(dest="cache_command", metavar="COMMAND")
    p = cache_sub.add_parser("clear", help="forget cached step outputs")
    p.add_argument("-p", "--pipeline", help="only this pipeline's cache entries")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_cache_clear)

    p = top.add_parser("run", help="run a pipeline with live progress")
    p.add_argument("target", metavar="MODULE:PIPELINE",
                   help="e.g. my_project.pipelines:training or flows.py:training")
    p.add_argument("-c", "--config", metavar="FILE", help="a run configuration YAML file")
    p.add_argument("--param", action="append", metavar="KEY=VALUE",
                   help="a pipeline parameter (repeatable); values are YAML scalars")
    p.add_argument("--run-name", help="the run's name (placeholders like {date} work)")
    p.add_argument("--no-cache", action="store_true", help="run every step, ignoring the cache")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress display")
    p.add_argument("-v", "--verbose", action="store_true", help="also print flowcore's log events")
    p.add_argument("--json", action="store_true", help="print the finished run as JSON")
    p.set_defaults(func=cmd_run)

    parser.set_defaults(_groups={"runs": runs, "cache": cache})
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the `flowcore` command line; returns the exit code."""
    parser = _build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version, or a usage error (already printed)
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
    func: Callable[[argparse.Namespace], int] | None = getattr(args, "func", None)
    if func is None:
        group = args._groups.get(args.command) if args.command else None
        (group or parser).print_help(sys.stderr)
        return 2
    try:
        return func(args)
    except UsageError as exc:
        _err(f"error: {exc}")
        return 2
    except RunNotFoundError as exc:
        _err(f"error: {exc}")
        return 2
    except KeyboardInterrupt:
        _err("interrupted")
        return 130
    except BrokenPipeError:
        # The reader went away (`flowcore runs list | head`): stop quietly.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1
    except FlowcoreError as exc:
        _err(f"error: {exc}")
        return 1
    except Exception as exc:
        if os.environ.get("FLOWCORE_DEBUG"):
            raise
        _err(f"error: unexpected {type(exc).__name__}: {exc} (set FLOWCORE_DEBUG=1 for the "
             "traceback)")
        return 1

"""The `flowcore` command: list, inspect, delete and report runs; clear the cache; start a run.

    flowcore runs list [--pipeline P] [--status S] [--limit N] [--json]
    flowcore runs show RUN [--json]
    flowcore runs logs RUN STEP [--json]
    flowcore runs delete RUN [--yes]
    flowcore runs report RUN [-o run.html]
    flowcore cache clear [--pipeline P] [--json]
    flowcore run module:pipeline [--config run.yaml] [--param k=v ...] [--json]

It reads the same store as the library (`$FLOWCORE_HOME`, or `$FLOWCORE_STACK`). Tables are
drawn with rich on a terminal and as plain text elsewhere; `--json` is for scripts. Exit
codes: 0 success, 1 a failed run (or a store error), 2 a usage error (unknown run, step or
module, bad parameter), 130 interrupted.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import inspect
import json
import os
import sys
from collections.abc import Callable, Sequence
from datetime import datetime
from pathlib import Path
from typing import IO, Any, NoReturn

from flowcore._models import PipelineRun, RunStatus, StepRun, StepStatus
from flowcore._report import ordered_steps
from flowcore._runview import (
    count_statuses,
    error_line,
    format_counts,
    format_duration,
    shorten,
    status_style,
)
from flowcore.exceptions import (
    ConfigError,
    FlowcoreError,
    PipelineDefinitionError,
    RunFailedError,
    RunNameConflictError,
    RunNotFoundError,
    UsageError,
)

__all__ = ["UsageError", "main"]

PROG = "flowcore"



class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{PROG}: error: {message} (see '{self.prog} --help')\n")


# -- output ---------------------------------------------------------------------------------


def _rich_console(stream: IO[str]) -> Any:
    """A rich Console for a terminal, or None (not a terminal, or rich not installed)."""
    if not getattr(stream, "isatty", lambda: False)():
        return None
    try:
        from rich.console import Console
    except ImportError:
        return None
    return Console(file=stream, highlight=False)


class _Out:
    """Writes tables and lines: rich on a terminal, aligned plain text elsewhere."""

    def __init__(self, stream: IO[str]) -> None:
        self.stream = stream
        self.console = _rich_console(stream)

    def line(self, text: str = "", style: str | None = None) -> None:
        if self.console is not None:
            from rich.text import Text

            self.console.print(Text(text, style=style or ""))
        else:
            self.stream.write(text + "\n")

    def facts(self, pairs: Sequence[tuple[str, str]], styles: dict[str, str] | None = None,
              ) -> None:
        width = max(len(k) for k, _ in pairs)
        for key, value in pairs:
            if self.console is not None:
                from rich.text import Text

                self.console.print(Text.assemble((f"{key:<{width}}  ", "dim"),
                                                 (value, (styles or {}).get(key, ""))))
            else:
                self.stream.write(f"{key:<{width}}  {value}\n")

    def table(self, headers: Sequence[str], rows: Sequence[Sequence[str]],
              status_col: int | None = None) -> None:
        if self.console is not None:
            from rich.table import Table

            table = Table(box=None, header_style="bold dim", pad_edge=False)
            for h in headers:
                table.add_column(h.upper(), overflow="fold")
            for row in rows:
                cells: list[Any] = list(row)
                if status_col is not None:
                    from rich.text import Text

                    cells[status_col] = Text(row[status_col], style=status_style(row[status_col]))
                table.add_row(*cells)
            self.console.print(table)
            return
        widths = [len(h) for h in headers]
        for row in rows:
            widths = [max(w, len(c)) for w, c in zip(widths, row, strict=True)]
        for row in [[h.upper() for h in headers], *rows]:
            self.stream.write("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True))
                              .rstrip() + "\n")


def _print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")


def _err(message: str) -> None:
    sys.stderr.write(f"{PROG}: {message}\n")


# -- runs as data ---------------------------------------------------------------------------


def _local(dt: datetime | None) -> str:
    return dt.astimezone().strftime("%Y-%m-%d %H:%M:%S") if dt else "-"


def _iso(dt: datetime | None) -> str | None:
    return dt.isoformat() if dt else None


def _run_duration(run: PipelineRun) -> float | None:
    if run.end_time is None:
        return None
    return (run.end_time - run.start_time).total_seconds()


def _counts(run: PipelineRun) -> dict[str, int]:
    return count_statuses(s.status.value for s in run.steps.values())


def _counts_text(run: PipelineRun) -> str:
    return format_counts(_counts(run))


def _error_summary(step_run: StepRun, limit: int = 80) -> str:
    return shorten(error_line(step_run), limit)


def _step_json(s: StepRun) -> dict[str, Any]:
    return {
        "name": s.name,
        "step": s.step_name,
        "status": s.status.value,
        "attempts": s.attempts,
        "start_time": _iso(s.start_time),
        "end_time": _iso(s.end_time),
        "duration": s.duration,
        "cached": s.status is StepStatus.CACHED,
        "cache_key": s.cache_key,
        "error": None if s.error is None else {"type": s.error.type, "message": s.error.message},
        "upstream": list(getattr(s, "upstream", ()) or ()),
        "outputs": {name: a.id for name, a in s.outputs.items()},
    }


def _run_json(run: PipelineRun, *, steps: bool) -> dict[str, Any]:
    data: dict[str, Any] = {
        "id": run.id,
        "name": run.name,
        "pipeline": run.pipeline_name,
        "status": run.status.value,
        "start_time": _iso(run.start_time),
        "end_time": _iso(run.end_time),
        "duration": _run_duration(run),
        "step_counts": _counts(run),
    }
    if steps:
        data["parameters"] = run.parameters
        data["steps"] = [_step_json(s) for s in ordered_steps(run)]
    return data


# -- commands -------------------------------------------------------------------------------


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
    rows = [[s.name, s.status.value, str(s.attempts), format_duration(s.duration),
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


# -- flowcore run ---------------------------------------------------------------------------


def load_pipeline(target: str) -> Any:
    """The Pipeline object named by `module:attr` (or `path/to/file.py:attr`); the current
    directory is importable."""
    from flowcore import Pipeline

    module_name, sep, attr = target.rpartition(":")
    if not sep or not module_name or not attr:
        raise UsageError(f"'{target}' is not module:pipeline (for example "
                         "'my_project.pipelines:training' or 'flows.py:training')")
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.insert(0, cwd)
    is_file = module_name.endswith(".py") or "/" in module_name or os.sep in module_name
    try:
        if is_file:
            module = _import_file(Path(module_name))
        else:
            module = importlib.import_module(module_name)
    except UsageError:
        raise
    except ModuleNotFoundError as exc:
        if exc.name and (module_name == exc.name or module_name.startswith(exc.name + ".")):
            raise UsageError(f"no module named '{module_name}' (looked in the current "
                             "directory and sys.path)") from None
        raise UsageError(f"importing '{module_name}' failed: {type(exc).__name__}: {exc}"
                         ) from None
    except Exception as exc:
        raise UsageError(f"importing '{module_name}' failed: {type(exc).__name__}: {exc}"
                         ) from None
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            names = sorted(n for n, v in vars(module).items() if isinstance(v, Pipeline))
            hint = f" (pipelines there: {', '.join(names)})" if names else ""
            raise UsageError(f"module '{module_name}' has no attribute '{attr}'{hint}")
        obj = getattr(obj, part)
    if not isinstance(obj, Pipeline):
        kind = type(obj).__name__
        article = "an" if kind[:1].lower() in "aeiou" else "a"
        raise UsageError(f"'{target}' is {article} {kind}, not a pipeline "
                         "(decorate a function with @pipeline)")
    return obj


def _import_file(path: Path) -> Any:
    if not path.is_file():
        raise UsageError(f"no file '{path}'")
    name = path.stem
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise UsageError(f"cannot import '{path}' as a module")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def parse_params(items: Sequence[str] | None, pipeline_obj: Any = None) -> dict[str, Any]:
    """`key=value` strings to a dict; values are YAML scalars (`3`, `0.5`, `true`, `text`)."""
    import yaml

    params: dict[str, Any] = {}
    for item in items or ():
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key.isidentifier():
            raise UsageError(f"bad parameter '{item}': expected key=value, e.g. --param lr=0.1")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            raise UsageError(f"bad parameter '{item}': the value is not valid YAML") from None
        params[key] = value
    if pipeline_obj is not None and params:
        sig = inspect.signature(pipeline_obj.func)
        takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in sig.parameters.values())
        known = [n for n, p in sig.parameters.items()
                 if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD,
                               inspect.Parameter.KEYWORD_ONLY)]
        for key in params:
            if not takes_any and key not in known:
                raise UsageError(f"bad parameter '{key}': pipeline '{pipeline_obj.name}' has no "
                                 f"parameter '{key}' (parameters: {', '.join(known) or 'none'})")
    return params


def cmd_run(args: argparse.Namespace) -> int:
    from flowcore import RunHandle, progress

    pipe = load_pipeline(args.target)
    params = parse_params(args.param, pipe)
    options: dict[str, Any] = {}
    if args.config:
        if not Path(args.config).is_file():
            raise UsageError(f"no config file '{args.config}'")
        options["config_path"] = args.config
    if args.run_name:
        options["run_name"] = args.run_name
    if args.no_cache:
        options["enable_cache"] = False
    if options:
        pipe = pipe.with_options(**options)
    if args.verbose:
        from flowcore import enable_console_logging

        enable_console_logging()
    run: PipelineRun | None = None
    # With --json, stdout is the JSON alone: what steps print goes to stderr meanwhile.
    quiet_stdout = contextlib.redirect_stdout(sys.stderr) if args.json else contextlib.nullcontext()
    with progress(not args.quiet, stream=sys.stderr), quiet_stdout:
        try:
            result = pipe(**params)
            if isinstance(result, RunHandle):
                result = result.result()
            run = result
        except RunFailedError as exc:
            run = exc.run
            if run is None:
                raise
        except (ConfigError, PipelineDefinitionError, RunNameConflictError) as exc:
            raise UsageError(str(exc)) from None
    assert run is not None
    if args.json:
        _print_json(_run_json(run, steps=True))
    else:
        sys.stdout.write(f"run {run.name} {run.status.value}\n")
        for s in ordered_steps(run):
            if s.status is StepStatus.FAILED:
                _err(f"step '{s.name}' failed: {_error_summary(s, 200)}")
        if run.status is not RunStatus.COMPLETED:
            _err(f"see 'flowcore runs show {run.name}' and "
                 f"'flowcore runs logs {run.name} STEP'")
    return 0 if run.status is RunStatus.COMPLETED else 1


# -- parser ---------------------------------------------------------------------------------


def _build_parser() -> _Parser:
    from flowcore import __version__

    parser = _Parser(prog=PROG, description="Inspect flowcore runs and start pipelines from "
                     "the shell. Reads the store under $FLOWCORE_HOME (default ./.flowcore).")
    parser.add_argument("--version", action="version", version=f"flowcore {__version__}")
    top = parser.add_subparsers(dest="command", metavar="COMMAND")

    runs = top.add_parser("runs", help="list, show, delete and report runs")
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


if __name__ == "__main__":
    sys.exit(main())

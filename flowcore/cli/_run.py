"""`flowcore run module:pipeline`: import the pipeline, parse `--param key=value`, run it with
live progress and print the outcome."""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import inspect
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from flowcore._models import PipelineRun, RunStatus, StepStatus
from flowcore._report import ordered_steps
from flowcore.cli._output import _err, _error_summary, _print_json, _run_json
from flowcore.exceptions import (
    ConfigError,
    PipelineDefinitionError,
    RunFailedError,
    RunNameConflictError,
    UsageError,
)


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
    return run_and_report(pipe, params, quiet=args.quiet, as_json=args.json)


def run_and_report(pipe: Any, params: dict[str, Any], *, quiet: bool, as_json: bool) -> int:
    """Run `pipe(**params)` with live progress (unless `quiet`) and print the finished run
    (as JSON with `as_json`); 0 if it completed, else 1."""
    from flowcore import RunHandle, progress

    run: PipelineRun | None = None
    # With --json, stdout is the JSON alone: what steps print goes to stderr meanwhile.
    quiet_stdout = contextlib.redirect_stdout(sys.stderr) if as_json else contextlib.nullcontext()
    with progress(not quiet, stream=sys.stderr), quiet_stdout:
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
    if as_json:
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

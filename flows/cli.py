"""The `alignflow` command: run the pipeline, inspect configs, runs and constitutions.

Exit codes: 0 ok, 1 a run failed, 2 bad input or usage. Errors are one line; --debug shows the traceback.
"""

import contextlib
import json
import os
import signal
import sys
from pathlib import Path
from typing import Annotated

import typer

# The temporary Prefect server's telemetry heartbeat races the run for its SQLite file at start-up and logs a
# "database is locked" traceback; our users run offline anyway.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
# Its default 20 s start-up wait fails runs on two busy cores (seen with three runs starting at once).
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Align language models with a written constitution, as cached Prefect flows.")
config_app = typer.Typer(no_args_is_help=True, help="Inspect the resolved configuration.")
constitution_app = typer.Typer(no_args_is_help=True, help="Validate constitution files.")
runs_app = typer.Typer(help="Flow runs recorded by the Prefect API.")
app.add_typer(config_app, name="config")
app.add_typer(constitution_app, name="constitution")
app.add_typer(runs_app, name="runs")

DEBUG = False

Preset = Annotated[str, typer.Option("--preset", "-p", help="a name in configs/ or a path to a YAML file")]
Sets = Annotated[list[str], typer.Option("--set", "-s", help="override one field: step.field=value (repeatable)")]
Json = Annotated[bool, typer.Option("--json", help="print one JSON object on stdout instead of a table")]


class Failure(Exception):
    """An error to report in one line with an exit code."""

    def __init__(self, message: str, code: int):
        super().__init__(message)
        self.code = code


@app.callback()
def main_options(debug: Annotated[bool, typer.Option("--debug", help="show tracebacks")] = False):
    global DEBUG
    DEBUG = debug


@app.command()
def run(
    steps: Annotated[list[str] | None, typer.Argument(help="steps to run, with what they need (default: all)")] = None,
    preset: Preset = "tiny",
    sets: Sets = None,
    store: Annotated[Path | None, typer.Option(help="the step store (default ./store or $ALIGNFLOW_STORE)")] = None,
    json_out: Json = False,
):
    """Run the pipeline: every step, or the named ones and the steps they need."""
    from flows.config import load_config
    from flows.pipeline import STEP_GRAPH, check_inputs

    cfg = load_config(preset, sets or [])
    unknown = [s for s in steps or [] if s not in STEP_GRAPH]
    if unknown:
        raise Failure(f"unknown step {unknown[0]!r} (steps: {', '.join(STEP_GRAPH)})", 2)
    check_inputs(cfg, steps)  # also refuses a step this config leaves out (pretrain_dense with policy.model_dir)
    root = store or Path(os.environ.get("ALIGNFLOW_STORE", "store"))
    # SIGTERM (kill, a scheduler's timeout) unwinds like Ctrl-C, so the temporary Prefect server is stopped with us
    # instead of outliving the run; the store needs nothing: a killed step resumes from its .partial directory.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    _quiet_prefect()
    from flows.pipeline import pipeline
    from tasks.store import Store

    st = Store(root)
    if json_out:  # stdout carries the one JSON object; whatever the libraries print goes to stderr
        with contextlib.redirect_stdout(sys.stderr):
            state = pipeline(cfg, st, steps, return_state=True)
    else:
        state = pipeline(cfg, st, steps, return_state=True)
    result = {"flow_run_id": str(state.state_details.flow_run_id), "state": state.name, "steps": st.history}
    if json_out:
        print(json.dumps(result, default=str))
    else:
        _print_steps(st.history)
        typer.echo(f"flow run {result['flow_run_id']}: {state.name}", err=True)
    if not state.is_completed():
        failed = next((s for s in st.history if s["state"] == "Failed"), None)
        reason = failed["error"] if failed else state.message
        raise Failure(f"run failed: {reason}", 1)


@app.command()
def steps(preset: Preset = "tiny", sets: Sets = None):
    """Print the step graph of this config: each step and the steps it reads from."""
    from flows.config import load_config
    from flows.pipeline import step_graph

    for step, inputs in step_graph(load_config(preset, sets or [])).items():
        source = "(policy.model_dir)" if step == "import_policy" else "(the tiny world)"
        typer.echo(f"{step:<20} <- {', '.join(inputs) or source}")


@config_app.command("show")
def config_show(preset: Preset = "tiny", sets: Sets = None):
    """Print the resolved configuration as YAML."""
    import yaml

    from flows.config import load_config

    cfg = load_config(preset, sets or [])
    typer.echo(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))


@constitution_app.command("check")
def constitution_check(files: Annotated[list[Path], typer.Argument(help="constitution YAML files")]):
    """Exit 0 when every file is valid, else print FILE:LINE: message per problem and exit 2."""
    from constitutions.schema import check_file

    problems = [p for path in files for p in check_file(path)]
    for problem in problems:
        typer.echo(problem)
    if problems:
        raise typer.Exit(2)
    typer.echo(f"{len(files)} file(s) valid", err=True)


@runs_app.callback(invoke_without_command=True)
def runs_list(ctx: typer.Context, limit: Annotated[int, typer.Option(min=1)] = 20, json_out: Json = False):
    """List recent flow runs: id, name, state, start, duration."""
    if ctx.invoked_subcommand:
        return
    from flows import history

    rows = history.flow_runs(limit)
    if json_out:
        print(json.dumps(rows, default=str))
        return
    _print_table(rows, ["id", "name", "state", "start", "seconds"])


@runs_app.command("show")
def runs_show(run_id: str, json_out: Json = False):
    """One flow run's task runs (name, state, duration) and artifacts."""
    from flows import history

    detail = history.flow_run_detail(run_id)
    if json_out:
        print(json.dumps(detail, default=str))
        return
    _print_table(detail["tasks"], ["name", "state", "seconds"])
    if detail["artifacts"]:
        typer.echo("")
        _print_table(detail["artifacts"], ["key", "type", "description"])


def _print_steps(history: list[dict]) -> None:
    rows = [{**s, "key": s["key"][:12], "metrics": _headline(s["metrics"])} for s in history]
    _print_table(rows, ["name", "state", "key", "path", "metrics", "seconds"])


def _headline(metrics: dict, limit: int = 3) -> str:
    scalars = [(k, v) for k, v in metrics.items() if isinstance(v, (int, float))][:limit]
    return " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in scalars)


def _print_table(rows: list[dict], columns: list[str]) -> None:
    cells = [[str(row.get(c, "")) for c in columns] for row in rows]
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]
    typer.echo("  ".join(c.upper().ljust(w) for c, w in zip(columns, widths)))
    for r in cells:
        typer.echo("  ".join(v.ljust(w) for v, w in zip(r, widths)))


def _quiet_prefect() -> None:
    """Prefect logs full tracebacks to the console; keep them for the UI and --debug, not the terminal."""
    if DEBUG:
        return
    import logging

    class DropTracebacks(logging.Filter):
        def filter(self, record):
            record.exc_info, record.exc_text = None, None
            return True

    from prefect.logging.configuration import setup_logging

    setup_logging()
    for handler in logging.getLogger("prefect").handlers:
        handler.addFilter(DropTracebacks())


def main() -> None:
    from tasks.store import InputError

    try:
        code = app(standalone_mode=False)  # click returns the code of a typer.Exit instead of raising it
        sys.exit(code if isinstance(code, int) else 0)
    except InputError as e:
        _fail(str(e), 2, e)
    except Failure as e:
        _fail(str(e), e.code, e)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except (typer.Abort, KeyboardInterrupt):
        _fail("interrupted", 130, None)
    except Exception as e:  # noqa: BLE001  (click usage errors and anything unexpected: one line, exit 1)
        import click

        if isinstance(e, click.exceptions.ClickException):
            e.show()
            sys.exit(2)
        _fail(f"{type(e).__name__}: {e}", 1, e)


def _fail(message: str, code: int, exc: BaseException | None) -> None:
    if DEBUG and exc is not None:
        import traceback

        traceback.print_exception(exc)
    typer.echo(f"error: {message}", err=True)
    sys.exit(code)


if __name__ == "__main__":
    main()

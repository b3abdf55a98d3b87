"""The ``hymba-batch`` command: ``run``, ``validate``, ``schema``, ``status``, ``demo``, and the
Ray job commands ``submit``, ``status JOB_ID --address``, ``logs`` and ``cancel`` (jobs/submit.py).

Before any planning or Ray, ``validate``, ``run`` and ``submit`` run the pre-flight checks
(``jobs/preflight.py``: model, input, output, each within seconds). Errors are one or two lines,
no traceback unless ``--debug``.

Exit codes: 0 done, 1 the job failed (units quarantined, see the summary; or another error,
told in one line, with the traceback only under ``HYMBA_DEBUG=1``), 2 a bad spec or input (the
message names the field, file or column), a refused submission, or another live run holds the
output (the message names its host, pid and start time; ``run --wait`` waits for it instead),
3 another run holds the output's lease in incremental mode (a skipped tick), 130 cancelled (Ctrl-C, or the
SIGTERM of ``hymba-batch cancel`` / ``ray job stop``; committed work is kept).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Callable

from rich.console import Console
from rich.markup import escape


SPEC_HELP = "job spec YAML (see `hymba-batch schema`; examples in jobs/examples/)"
SET_HELP = "override a spec field (value parsed as YAML; repeatable), e.g. --set output.uri=s3://bucket/out/"
DEBUG_HELP = "show tracebacks and Ray's start-up messages"
NO_CHECK_HELP = "skip the pre-flight checks of model, input and output (e.g. paths only the cluster can reach)"


def _parser() -> argparse.ArgumentParser:
    from .quiet import version

    ap = argparse.ArgumentParser(prog="hymba-batch", description="Batch inference with Hymba on Ray: "
                                 "Parquet in, exactly-once Parquet/Arrow out.")
    ap.add_argument("--version", action="version", version=f"hymba-batch {version()}")
    ap.add_argument("--debug", action="store_true", help=DEBUG_HELP)
    common = argparse.ArgumentParser(add_help=False)  # --debug also after the command
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=DEBUG_HELP)
    sub = ap.add_subparsers(dest="cmd", required=True, metavar="COMMAND",
                            help="what to do (`hymba-batch COMMAND --help` for its options)")

    def add(name: str, text: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=text, description=text[:1].upper() + text[1:] + ".", parents=[common])

    r = add("run", "run or resume a job")
    r.add_argument("spec", help=SPEC_HELP)
    r.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help=SET_HELP)
    r.add_argument("--no-check", action="store_true", help=NO_CHECK_HELP)
    r.add_argument("--restart", action="store_true",
                   help="delete another run's output in output.uri and start over")
    r.add_argument("--no-progress", action="store_true", help="no live progress bar")
    r.add_argument("--incremental", action="store_true",
                   help="process only input files no earlier run into output.uri processed (or that changed)")
    r.add_argument("--every", metavar="DURATION", default=None,
                   help="with --incremental: run now, then at every tick (30m, 1h, 1d) until Ctrl-C")
    r.add_argument("--run-id", default=None, help="name of this incremental run (default: UTC time + random)")
    r.add_argument("--max-iterations", type=int, default=None, help=argparse.SUPPRESS)  # tests of --every
    r.add_argument("--wait", action="store_true",
                   help="if another run holds output.uri, wait for it to finish instead of refusing")
    r.add_argument("--wait-timeout", default=None, metavar="DURATION",
                   help="with --wait: give up (exit 2) after DURATION (30s, 10m, 1h); default: no limit")
    v = add("validate", "check a spec, its model, input and output (with --plan, also list the input and "
                        "cut it into units)")
    v.add_argument("spec", help=SPEC_HELP)
    v.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help=SET_HELP)
    v.add_argument("--plan", action="store_true", help="also list the input and cut it into units")
    v.add_argument("--no-check", action="store_true", help=NO_CHECK_HELP)
    add("schema", "print the job spec's JSON schema (every field, described)")
    s = add("status", "status of a job: from its output prefix, or a Ray job id with --address")
    s.add_argument("target", metavar="OUTPUT_URI|JOB_ID", help="an output prefix (a path or s3:// URI), or the "
                                                                "submission id that `submit` printed")
    s.add_argument("--address", default=None, help="Ray job server, e.g. http://127.0.0.1:8265 (or $RAY_ADDRESS)")
    s.add_argument("--json", action="store_true", help="print the raw status document(s) as JSON instead of a table")
    rp = add("report", "write a job's report: one HTML page with plots (throughput per actor, "
                       "lengths, finish reasons, errors, time split)")
    rp.add_argument("output_uri", metavar="OUTPUT_URI", help="the job's output prefix (local path or s3://)")
    rp.add_argument("--out", default=None, metavar="PATH",
                    help="where to write the page (local path or s3://; default OUTPUT_URI/_hymba/report.html)")
    d = add("demo", "sample data + tiny model + local S3 API + local Ray, end to end")
    d.add_argument("--workdir", default=None, help="folder for the demo's files (default: a new temp folder); "
                                                   "it keeps the sample articles, the tiny model, the output "
                                                   "and the S3 server's log")
    d.add_argument("--rows", type=int, default=300, help="rows of sample articles to make (3 Parquet files; "
                                                         "default 300)")
    sb = add("submit", "submit a job to a Ray cluster's job server")
    sb.add_argument("spec", help=SPEC_HELP)
    sb.add_argument("--address", default=None, help="Ray job server, e.g. http://127.0.0.1:8265 (or $RAY_ADDRESS); "
                                                    "Ray's auth token is sent when the server asks for one")
    sb.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help=SET_HELP)
    sb.add_argument("--no-check", action="store_true", help=NO_CHECK_HELP)
    sb.add_argument("--quiet", "-q", action="store_true",
                    help="print only the submission id, for scripts: JOB_ID=$(hymba-batch submit ... --quiet)")
    sb.add_argument("--incremental", action="store_true", help="an incremental run (see `run --incremental`)")
    sb.add_argument("--window", default=None,
                    help="schedule window id added to the submission id (default for incremental jobs: the "
                         "current UTC window of schedule.window); the same window is never submitted twice")
    for name, text in (("logs", "print a submitted job's log"), ("cancel", "stop a submitted job (keeps "
                                                                              "committed units)")):
        c = add(name, text)
        c.add_argument("job_id", help="the submission id that `submit` printed")
        c.add_argument("--address", default=None, help="Ray job server (or $RAY_ADDRESS)")
        if name == "logs":
            c.add_argument("--follow", "-f", action="store_true", help="keep printing until the job ends")
    return ap


def _looks_like_output(target: str) -> bool:
    return "://" in target or "/" in target or target.startswith(("~", ".")) or os.path.exists(target)


def every_loop(run_once: Callable[[], int], interval_s: float, max_iterations: int | None = None,
               sleep: Callable[[float], None] = time.sleep, clock: Callable[[], float] = time.monotonic,
               say: Callable[[str], None] = print) -> int:
    """Call ``run_once`` now and at every later tick ``start + k * interval_s``; a run that
    overruns skips the ticks it missed (runs never overlap). A failed run (an exit code other
    than 0, or an exception, reported in one line) does not end the loop: the next tick runs
    again (the input or the store may be back by then; mistakes in the spec are caught by the
    pre-flight before the first run). Ends on Ctrl-C (130) or after ``max_iterations``;
    returns the last run's exit code."""
    start = clock()
    done = 0
    while True:
        try:
            rc = run_once()
        except KeyboardInterrupt:
            return 130
        except Exception as e:  # noqa: BLE001 - one line, then the next tick
            say(f"run failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
            rc = 1
        done += 1
        if rc == 130 or (max_iterations is not None and done >= max_iterations):
            return rc
        now = clock()
        nxt = start + (math.floor((now - start) / interval_s) + 1) * interval_s
        say(f"next run in {nxt - now:.0f} s (Ctrl-C to stop)")
        try:
            sleep(nxt - now)
        except KeyboardInterrupt:
            return 130


def _run_once(spec, args, console: Console, err: Console) -> int:  # noqa: ANN001 - JobSpec, Namespace
    from hymba_batch.pipeline.lease import LeaseHeld
    from hymba_batch.workers.pool import PoolError

    from .driver import run_job
    from .progress import RichReporter, summary_table
    reporter = None if args.no_progress else RichReporter(console=err)
    from .quiet import version
    err.print(f"hymba-batch {version()}: {'incremental run' if args.incremental else 'run'} {spec.name} "
              f"-> {spec.output.uri}", highlight=False, soft_wrap=True)
    try:
        summary = run_job(spec, restart=args.restart, reporter=reporter, incremental=args.incremental,
                          run_id=args.run_id, wait=args.wait_s,
                          say=lambda m: err.print(m, highlight=False, soft_wrap=True))
    except LeaseHeld as e:
        if args.incremental:
            err.print(f"[yellow]skipped[/]: {e}", highlight=False, soft_wrap=True)
            return 3
        err.print(f"[red]error[/]: {e}", highlight=False, soft_wrap=True)
        return 2
    except PoolError as e:
        err.print(f"[red]error[/]: {e}", highlight=False, soft_wrap=True)
        return 1
    except KeyboardInterrupt:
        err.print("cancelled; committed units are kept")
        return 130
    except Exception as e:  # noqa: BLE001 - one line for the user; HYMBA_DEBUG=1 for the traceback
        from hymba_batch.pipeline.commit import OutputConflict
        from hymba_batch.pipeline.shards import InputError

        from .spec import SpecError
        if isinstance(e, (SpecError, InputError, OutputConflict)):
            raise  # main's exit 2
        if os.environ.get("HYMBA_DEBUG"):
            import traceback
            traceback.print_exc()
        text = " ".join(str(e).split())
        err.print(f"[red]error[/]: {type(e).__name__}: {text[:500]}", highlight=False, soft_wrap=True)
        return 1
    console.print(summary_table(summary))
    if summary.run_id:
        console.print(f"run {summary.run_id}: {summary.new_files} new, {summary.changed_files} changed, "
                      f"{summary.unchanged_files} unchanged input file(s)", soft_wrap=True)
    return {"succeeded": 0, "failed": 1, "cancelled": 130}[summary.state]


def _ray_commands(args: argparse.Namespace, console: Console) -> int:
    from . import submit as sj

    if args.cmd == "submit":
        from .spec import load_spec

        spec = load_spec(args.spec, args.overrides)
        if not args.no_check:
            from .preflight import preflight
            preflight(spec)
        sub = sj.plan_submission(spec, incremental=args.incremental, window=args.window,
                                 debug=getattr(args, "debug", False))
        address = sj.job_server_address(args.address)
        if args.quiet:
            sj.submit(address, sub, say=print)
            return 0
        sj.submit(address, sub, say=lambda sid: console.print(
            f"submitted [bold]{sid}[/]\n  hymba-batch status {sid} --address {address}\n"
            f"  hymba-batch logs {sid} --address {address} --follow", highlight=False, soft_wrap=True))
        return 0
    if args.cmd == "status":
        doc = sj.job_status(args.address, args.target)
        if args.json:
            print(json.dumps(doc, indent=2, sort_keys=True, default=str))
            return 0
        from .status_view import read_history, status_table
        history = read_history(doc["output_uri"], args.target) if doc.get("output_uri") and doc.get("job") else None
        console.print(status_table(doc.get("job"), history, ray=doc))
        return 0
    if args.cmd == "logs":
        sj.job_logs(args.address, args.job_id, args.follow, lambda s: (sys.stdout.write(s), sys.stdout.flush()))
        return 0
    doc = sj.cancel(args.address, args.job_id, say=lambda m: print(m, file=sys.stderr))
    print(json.dumps(doc, indent=2, sort_keys=True, default=str))
    return 0 if doc["ray_status"] in sj.TERMINAL else 1


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    console, err = Console(), Console(stderr=True)
    debug = bool(getattr(args, "debug", False)) or os.environ.get("HYMBA_DEBUG", "") not in ("", "0")
    args.debug = debug
    try:
        return _main(args, console, err)
    except KeyboardInterrupt:
        err.print("cancelled; committed units are kept")
        return 130
    except Exception as e:  # not a known user error: one line, the traceback with --debug
        if debug:
            raise
        err.print(f"[red]error[/]: {type(e).__name__}: {escape(str(e))}", highlight=False, soft_wrap=True)
        err.print("(run again with --debug for the traceback)", highlight=False)
        return 1


def _main(args: argparse.Namespace, console: Console, err: Console) -> int:
    from hymba_batch.pipeline.commit import OutputConflict
    from hymba_batch.pipeline.preflight import PreflightError
    from hymba_batch.pipeline.shards import InputError

    from .spec import JobSpec, SpecError, load_spec, parse_duration
    from .submit import SubmitError

    if not args.debug:
        from .quiet import quiet_ray
        quiet_ray()
    try:
        if args.cmd == "schema":
            print(json.dumps(JobSpec.model_json_schema(), indent=2))
            return 0
        if args.cmd == "report":
            from hymba_batch.pipeline.report_data import NoJob

            from .report import write_report
            try:
                console.print(f"report: {write_report(args.output_uri, args.out)}", highlight=False, soft_wrap=True)
            except NoJob as e:
                err.print(f"[red]error[/]: {e}", highlight=False, soft_wrap=True)
                return 2
            return 0
        if args.cmd == "demo":
            from .demo import run_demo
            return run_demo(args.workdir, args.rows, console)
        if args.cmd == "status" and (args.address is None and not os.environ.get("RAY_ADDRESS")
                                     or _looks_like_output(args.target)):
            from hymba_batch.pipeline.commit import JobOutput
            if not _looks_like_output(args.target):
                err.print(f"{args.target}: not an output path; for a Ray job id pass --address URL")
                return 2
            if args.target.startswith("s3://"):  # a bad S3 setup: one line in seconds, not minutes of retries
                from hymba_batch.pipeline.preflight import check_s3_read
                check_s3_read(args.target, "output")
            doc = JobOutput(args.target, "parquet").read_status()
            if doc is None:
                err.print(f"{args.target}: no _hymba/status.json (no job has run there)")
                return 2
            from .heartbeat import with_liveness
            doc = with_liveness(args.target, doc)  # a "running" job whose driver died: "dead"
            if args.json:
                print(json.dumps(doc, indent=2, sort_keys=True))
                return 0
            from .status_view import read_history, status_table
            console.print(status_table(doc, read_history(args.target, doc.get("run_id"))))
            return 0
        if args.cmd in ("submit", "status", "logs", "cancel"):
            return _ray_commands(args, console)
        spec = load_spec(args.spec, args.overrides)
        if args.cmd == "validate":
            if not args.no_check:
                from .preflight import preflight
                preflight(spec)
            if args.plan:
                from .driver import plan_job
                plan = plan_job(spec)
                console.print(f"{len(plan.files)} input file(s), {plan.total_rows} rows, {len(plan.units)} "
                              f"unit(s); fingerprint {plan.fingerprint[:12]}", soft_wrap=True)
            console.print(f"[green]ok[/]: {args.spec}", soft_wrap=True)
            return 0
        from hymba_batch.pipeline.incremental import check_run_id

        from .driver import handle_stop_signals
        if args.run_id:
            try:
                check_run_id(args.run_id)
            except ValueError as e:
                raise SpecError(f"--run-id: {e}") from None
        args.incremental = args.incremental or spec.schedule.incremental
        try:
            args.wait_s = (None if not args.wait else math.inf if args.wait_timeout is None
                           else parse_duration(args.wait_timeout, "--wait-timeout"))
        except ValueError as e:
            raise SpecError(str(e)) from None
        interval = None
        if args.every is not None:
            if not args.incremental:
                raise SpecError("--every: only for incremental runs (add --incremental or schedule.incremental: true)")
            if args.run_id:
                raise SpecError("--run-id: not with --every (each run gets its own id)")
            try:
                interval = parse_duration(args.every, "--every")
            except ValueError as e:
                raise SpecError(str(e)) from None
        if not args.no_check:
            from .preflight import preflight
            preflight(spec)
        handle_stop_signals()
        if args.debug:
            err.print(f"hymba-batch code: {Path(__file__).resolve().parent.parent}", highlight=False, soft_wrap=True)
        if interval is None:
            return _run_once(spec, args, console, err)
        return every_loop(lambda: _run_once(spec, args, console, err), interval, args.max_iterations,
                          say=lambda m: err.print(m, highlight=False))
    except (SpecError, InputError, OutputConflict, SubmitError, PreflightError) as e:
        if args.debug:
            import traceback
            traceback.print_exc()
        err.print(f"[red]error[/]: {escape(str(e))}", highlight=False, soft_wrap=True)
        return 2


if __name__ == "__main__":
    sys.exit(main())

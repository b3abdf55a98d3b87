"""The ``hymba-batch`` command: ``run``, ``validate``, ``schema``, ``status`` and ``demo``.

Exit codes: 0 done, 1 the job failed (units quarantined, see the summary), 2 a bad spec or
input (the message names the field, file or column), 130 cancelled (committed work is kept).
"""

from __future__ import annotations

import argparse
import json
import sys

from rich.console import Console


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="hymba-batch", description="Batch inference with Hymba on Ray: "
                                 "Parquet in, exactly-once Parquet/Arrow out.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="run or resume a job")
    r.add_argument("spec", help="job spec YAML")
    r.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a spec field, e.g. --set output.uri=s3://bucket/out/")
    r.add_argument("--restart", action="store_true",
                   help="delete another run's output in output.uri and start over")
    r.add_argument("--no-progress", action="store_true", help="no live progress bar")
    v = sub.add_parser("validate", help="check a spec (and with --plan, list its input and units)")
    v.add_argument("spec")
    v.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    v.add_argument("--plan", action="store_true", help="also list the input and cut it into units")
    sub.add_parser("schema", help="print the job spec's JSON schema")
    s = sub.add_parser("status", help="print the status of a job from its output prefix")
    s.add_argument("output_uri")
    d = sub.add_parser("demo", help="sample data + tiny model + local S3 API + local Ray, end to end")
    d.add_argument("--workdir", default=None, help="folder for the demo's files (default: a new temp folder)")
    d.add_argument("--rows", type=int, default=300)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    console, err = Console(), Console(stderr=True)
    from hymba_batch.pipeline.commit import OutputConflict
    from hymba_batch.pipeline.shards import InputError

    from .spec import JobSpec, SpecError, load_spec

    try:
        if args.cmd == "schema":
            print(json.dumps(JobSpec.model_json_schema(), indent=2))
            return 0
        if args.cmd == "demo":
            from .demo import run_demo
            return run_demo(args.workdir, args.rows, console)
        if args.cmd == "status":
            from hymba_batch.pipeline.commit import JobOutput
            out = JobOutput(args.output_uri, "parquet")
            doc = out.read_status()
            if doc is None:
                err.print(f"{args.output_uri}: no _hymba/status.json (no job has run there)")
                return 2
            print(json.dumps(doc, indent=2, sort_keys=True))
            return 0
        spec = load_spec(args.spec, args.overrides)
        if args.cmd == "validate":
            if args.plan:
                from .driver import plan_job
                plan = plan_job(spec)
                console.print(f"{len(plan.files)} input file(s), {plan.total_rows} rows, {len(plan.units)} "
                              f"unit(s); fingerprint {plan.fingerprint[:12]}", soft_wrap=True)
            console.print(f"[green]ok[/]: {args.spec}", soft_wrap=True)
            return 0
        from hymba_batch.workers.pool import PoolError

        from .driver import run_job
        from .progress import RichReporter, summary_table
        reporter = None if args.no_progress else RichReporter(console=err)
        try:
            summary = run_job(spec, restart=args.restart, reporter=reporter)
        except PoolError as e:
            err.print(f"[red]error[/]: {e}", highlight=False, soft_wrap=True)
            return 1
        console.print(summary_table(summary))
        return {"succeeded": 0, "failed": 1, "cancelled": 130}[summary.state]
    except (SpecError, InputError, OutputConflict) as e:
        err.print(f"[red]error[/]: {e}", highlight=False, soft_wrap=True)
        return 2
    except KeyboardInterrupt:
        err.print("cancelled; committed units are kept")
        return 130


if __name__ == "__main__":
    sys.exit(main())

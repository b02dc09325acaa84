"""`graceful labels import CONFIG FILE`: join a warehouse's labels to the prediction log.

The labels go straight into the log the config's `serving.prediction_log` names (the
sqlite file under the run directory, or Redis), whether or not a router is running: a
router reads the same counters. Exit 0 with how many joined; 2 for a bad config, a
file that cannot be read or has bad rows (nothing joins then), or a memory log (it lives
inside the router: post to /v1/feedback/batch instead).
"""

from __future__ import annotations

import argparse
import sys

from orchestrator.cli.common import EXIT_OK, UsageError, add_config_arg, add_json_arg, emit, load_or_exit


def _cmd_import(args: argparse.Namespace) -> int:
    from serving.predlog import LogConfigError, open_log
    from serving.predlog.labels import LabelFileError, import_labels, read_labels

    if args.batch_size < 1:
        raise UsageError(f"--batch-size: must be >= 1, got {args.batch_size}")
    cfg = load_or_exit(args.config)
    if cfg.serving.prediction_log == "memory":
        raise UsageError(f"{args.config}: serving.prediction_log is memory: it lives inside the router process; "
                         f"post the labels to the router's /v1/feedback/batch, or use the sqlite or redis log")
    try:
        items = read_labels(args.file)
    except LabelFileError as e:
        for line in e.problems:
            print(line, file=sys.stderr)
        raise SystemExit(2)
    try:
        log = open_log(cfg.serving)
    except (LogConfigError, RuntimeError) as e:
        raise UsageError(str(e)) from None
    quiet = args.json or args.quiet

    def progress(s) -> None:
        if not quiet:
            print(f"labels: {s.rows}/{len(items)} rows, {s.outcomes['joined']} joined "
                  f"({s.labels_per_s:,.0f}/s)", file=sys.stderr, flush=True)

    try:
        summary = import_labels(log, items, batch_size=args.batch_size, progress=progress)
    finally:
        log.close()
    out = {"file": args.file, "log": cfg.serving.prediction_log, **summary.as_dict()}
    o = summary.outcomes
    emit(out, args.json, lambda d: f"{d['joined']} of {d['rows']} labelled requests joined "
                                   f"({d['labelled_samples']} samples); duplicate {o['duplicate']}, "
                                   f"unknown {o['unknown']}, mismatched {o['mismatched']}, partial {o['partial']}; "
                                   f"{d['seconds']:.2f} s, {d['labels_per_s']:,.0f} labels/s")
    return EXIT_OK


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("labels", help="labels that arrive later, from files")
    labels_sub = p.add_subparsers(dest="labels_command", required=True, metavar="ACTION")
    imp = labels_sub.add_parser("import", help="join a JSONL, CSV or Parquet file of request_id, labels "
                                               "to the prediction log")
    add_config_arg(imp)
    imp.add_argument("file", help="labels: .jsonl/.ndjson, .csv or .parquet with request_id and labels")
    imp.add_argument("--batch-size", type=int, default=5000, help="labelled requests per join transaction")
    imp.add_argument("--quiet", action="store_true", help="no progress lines")
    add_json_arg(imp)
    imp.set_defaults(func=_cmd_import)

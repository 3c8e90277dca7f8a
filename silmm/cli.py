"""The `silmm` command (also `python -m silmm`).

Exit status: 0 success, 1 a check failed (e.g. `verify` found bad shards), 2 bad config or usage.
"""

from __future__ import annotations

import argparse
import logging
import sys

from silmm import __version__
from silmm import config as C


def _cmd_config_show(args: argparse.Namespace) -> int:
    cfg = C.load(args.config, args.overrides)
    print(f"# config hash {C.config_hash(cfg)}")
    print(C.to_yaml(cfg), end="")
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    from silmm.rundir import RunDir

    cfg = C.load(args.config, args.overrides)
    run = RunDir.create_or_open(cfg)
    print(f"run directory {run.path} (config {run.config_hash})")
    print("silmm run: the iteration driver is not implemented yet (issue #6); the run directory and its "
          "frozen config are ready, and stages can be inspected with `silmm inspect`.")
    return 0


def _cmd_inspect(args: argparse.Namespace) -> int:
    from silmm.inspection import inspect_path

    print(inspect_path(args.path))
    return 0


def _cmd_verify(args: argparse.Namespace) -> int:
    from silmm.inspection import verify_run
    from silmm.rundir import RunDir

    run = RunDir.open(args.run)
    bad = verify_run(run)
    if not bad:
        print(f"{run.path}: all shards valid")
        return 0
    print(f"{run.path}: {len(bad)} bad shard(s):")
    for path, problem in bad:
        print(f"  {path}: {problem}")
    return 1


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="silmm", description=__doc__.splitlines()[0])
    p.add_argument("--version", action="version", version=f"silmm {__version__}")
    p.add_argument("--log-level", default="INFO")
    sub = p.add_subparsers(dest="command", required=True)

    cfg = sub.add_parser("config", help="show a resolved config").add_subparsers(dest="action", required=True)
    show = cfg.add_parser("show", help="print the resolved config and its hash")
    show.add_argument("config")
    show.add_argument("overrides", nargs="*", help="key=value dotlist overrides")
    show.set_defaults(func=_cmd_config_show)

    run = sub.add_parser("run", help="create or resume a run and advance it")
    run.add_argument("config")
    run.add_argument("overrides", nargs="*", help="key=value dotlist overrides")
    run.set_defaults(func=_cmd_run)

    ins = sub.add_parser("inspect", help="summarise a shard or a run directory")
    ins.add_argument("path")
    ins.set_defaults(func=_cmd_inspect)

    ver = sub.add_parser("verify", help="validate every shard of a run; list the bad ones")
    ver.add_argument("run")
    ver.set_defaults(func=_cmd_verify)
    return p


def main(argv: list[str] | None = None) -> int:
    from silmm.store import ShardError

    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except C.ConfigError as exc:
        print(f"silmm: config error: {exc}", file=sys.stderr)
        return 2
    except ShardError as exc:
        print(f"silmm: shard error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())

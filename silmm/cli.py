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
    cfg = C.load(args.config, args.overrides, args.profile)
    print(f"# config hash {C.config_hash(cfg)}")
    print(C.to_yaml(cfg), end="")
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    from silmm.driver import DriverError, driver_lock, run_driver, submit_detached
    from silmm.rundir import RunDir

    cfg = C.load(args.config, args.overrides, args.profile)  # every config error stops here, before any write
    if cfg.toy.enabled:
        from silmm.models import check_pretrained

        check_pretrained(cfg)
    planned = RunDir.prepare(cfg)  # an existing run: result-changing keys refused here, nothing rewritten
    try:
        # the lock before config.yaml is written or rewritten: a driver refused by it changes nothing
        with driver_lock(planned, args.break_lock):
            run = RunDir.create_or_open(cfg)
            print(f"run directory {run.path} (config {run.config_hash})", flush=True)
            if not args.detach:
                run_driver(run, lock_held=True)
    except DriverError as exc:
        print(f"silmm: {exc}", file=sys.stderr)
        return 1
    if args.detach:  # after the lock is released: the driver job takes it over (break_lock) when it starts
        job_id = submit_detached(run, args.config, args.overrides, args.profile)
        print(f"driver submitted as Slurm job {job_id}; follow it with `silmm status {run.path}`")
        return 0
    print(f"done: {run.config.run.iterations} iteration(s); model in {run.model_dir(run.config.run.iterations)}")
    return 0


def _cmd_init(args: argparse.Namespace) -> int:
    """The run directory (created, or an existing one checked) without a driver, and the sbatch commands of
    one iteration, for people who submit with plain sbatch."""
    import shutil

    from silmm.driver import DriverError, driver_lock
    from silmm.executors import SlurmLimits, sbatch_iteration, slurm_limits
    from silmm.models import ensure_base_model
    from silmm.rundir import RunDir

    cfg = C.load(args.config, args.overrides, args.profile)  # every config error stops here, before any write
    if cfg.toy.enabled:
        raise C.ConfigError(f"{args.config}: the toy world pretrains its LMM first (`silmm run`); plain sbatch "
                            "starts from an existing checkpoint")
    planned = RunDir.prepare(cfg)  # an existing run: result-changing keys refused here, nothing rewritten
    try:
        with driver_lock(planned):  # a running driver owns the run: init changes nothing then
            run = RunDir.create_or_open(cfg)
            ensure_base_model(run.config)  # a tiny config's checkpoint, built once before any job could race
    except DriverError as exc:
        print(f"silmm: {exc}", file=sys.stderr)
        return 1
    done = run.state().get("done", {})
    iteration = args.iteration or next((k for k in range(1, cfg.run.iterations + 1) if f"iter_{k:02d}" not in done),
                                       cfg.run.iterations)
    limits = slurm_limits() if shutil.which("scontrol") else SlurmLimits()
    print(sbatch_iteration(run, iteration, limits), end="")
    return 0


def _cmd_shards(args: argparse.Namespace) -> int:
    """How many shards a stage has (slurm/sbatch/stage.sh checks its array index against it); exit 3 while not
    yet known (prompt files before their first shard)."""
    from silmm.rundir import SHARD_STAGES, RunDir

    run = RunDir.open(args.run)
    if args.stage in ("eval", "eval_results"):
        if not args.benchmark:
            raise C.ConfigError(f"silmm shards: stage {args.stage} needs --benchmark NAME")
        from silmm.eval import stage as E

        count = E.plan(run, args.iteration, args.benchmark).shard_count if args.stage == "eval" else 1
    elif args.stage in SHARD_STAGES:
        count = run.num_shards(args.iteration)
    else:
        count = 1  # pairs, train, evaluate, pretrain: one task
    if count is None:
        print(f"{run.path}: shard count of {args.stage} not known yet (prompt files: the first prompts shard "
              "records it)", file=sys.stderr)
        return 3
    print(count)
    return 0


def _cmd_status(args: argparse.Namespace) -> int:
    from silmm.rundir import RunDir
    from silmm.status import describe_status

    print(describe_status(RunDir.open(args.run)))
    return 0


def _cmd_cancel(args: argparse.Namespace) -> int:
    from silmm.rundir import RunDir
    from silmm.status import cancel

    done = cancel(RunDir.open(args.run))
    print("cancelled: " + ("\n  ".join(["", *done]) if done else "nothing was running"))
    return 0


def _cmd_inspect(args: argparse.Namespace) -> int:
    from silmm.inspection import inspect_path

    print(inspect_path(args.path))
    return 0


def _cmd_verify(args: argparse.Namespace) -> int:
    from silmm.inspection import REMOVED_BY_GC, verify_run
    from silmm.rundir import RunDir

    run = RunDir.open(args.run)
    found = verify_run(run)
    problems = [(p, what) for p, what in found if not what.startswith(REMOVED_BY_GC)]
    for path, note in found:
        if note.startswith(REMOVED_BY_GC):  # not a problem: `silmm gc` removed what nothing reads any more
            print(f"  {path}: {note}")
    if not problems:
        print(f"{run.path}: all shards, pairs and models valid")
        return 0
    print(f"{run.path}: {len(problems)} problem(s):")
    for path, problem in problems:
        print(f"  {path}: {problem}")
    return 1


def _cmd_gc(args: argparse.Namespace) -> int:
    from silmm import gc as G
    from silmm.rundir import RunDir

    run = RunDir.open(args.run)
    categories = G.select(args.only, args.keep)  # an unknown category: ConfigError, exit 2
    if not args.yes:
        print(G.describe(run, G.plan(run, categories), categories, dry_run=True))
        return 0
    try:
        done = G.collect(run, categories)
    except G.GcRefused as exc:
        print(f"silmm: {exc}", file=sys.stderr)
        return 1
    print(G.describe(run, done, categories, dry_run=False))
    print(f"recorded in {run.path}/iter_KK/{G.RECORD}")
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from silmm.eval.report import write_benchmark_report, write_feedback_report, write_index
    from silmm.report import NoMetricsError, ReportError, write_training_report
    from silmm.rundir import RunDir
    from silmm.store import ShardError

    run = RunDir.open(args.run)  # not a run directory: ConfigError, exit 2
    status, notes = 0, []
    training = feedback = benchmarks = None
    try:
        training = write_training_report(run)
    except NoMetricsError as exc:  # not yet an error: another part may have something to show
        notes.append(str(exc))
    except ReportError as exc:  # a corrupt metrics line: a check failed, exit 1 (the other parts still written)
        print(f"silmm: {exc}", file=sys.stderr)
        status = 1
    if training is not None:
        print(f"training figure: {training.figure}")
        print(f"training table:  {training.table}")
        for k, why in sorted(training.skipped.items()):
            print(f"  iteration {k}: no metrics ({why})")
    try:
        feedback = write_feedback_report(run)
    except ShardError as exc:  # a corrupt scores shard or pairs file: named, exit 1
        print(f"silmm: shard error: {exc}", file=sys.stderr)
        status = 1
    try:
        benchmarks = write_benchmark_report(run)
    except ReportError as exc:  # a corrupt results.json: named, exit 1
        print(f"silmm: {exc}", file=sys.stderr)
        status = 1
    if feedback is not None:
        print(f"self-feedback:   {feedback.table}")
    if benchmarks is not None:
        print(f"benchmarks:      {benchmarks.table} ({', '.join(benchmarks.results)})")
    if training is None and feedback is None and benchmarks is None:
        for note in notes:  # nothing to report at all: exit 1, as before the benchmark part existed
            print(f"silmm: {note}", file=sys.stderr)
        return 1
    for note in notes:
        print(f"note: {note}")
    parts = [("training", training and training.table), ("self-feedback", feedback and feedback.table),
             ("benchmarks", benchmarks and benchmarks.table)]
    index = write_index(run, parts, notes)
    print(f"index:           {index}")
    return status


def _cmd_eval(args: argparse.Namespace) -> int:
    from silmm.driver import DriverError, driver_lock, run_eval_driver
    from silmm.eval.records import BenchmarkError
    from silmm.eval.results import read_results, results_path
    from silmm.rundir import RunDir
    from silmm.tasks import model_problem

    run = RunDir.open(args.run)
    source = str(run.path / "config.yaml")
    new = None
    if args.overrides:  # eval.* keys only: they are outside the run's hash, so the run stays the same run
        other = [o for o in args.overrides if not o.split("=", 1)[0].strip().startswith("eval.")]
        if other:
            raise C.ConfigError(f"silmm eval changes eval.* keys only; got {', '.join(other)}")
        new = C.load(source, args.overrides, frozen=True)  # validated; written to config.yaml under the lock
        run.check_reopen(new)
    else:
        C.validate(run.config, source)
    cfg = new or run.config
    names = args.benchmarks.split(",") if args.benchmarks else list(cfg.eval.benchmarks)
    if not names:
        raise C.ConfigError(f"{source}: no benchmark configured; add eval.benchmarks.<name>.path=... (e.g. "
                            f"`silmm eval {args.run} eval.benchmarks.t2i_compbench.path=/data/T2I-CompBench`)")
    missing = [n for n in names if n not in cfg.eval.benchmarks]
    if missing:
        raise C.ConfigError(f"{source}: benchmark(s) {', '.join(missing)} not configured; configured: "
                            f"{', '.join(cfg.eval.benchmarks) or 'none'} (add eval.benchmarks.<name>.path=...)")
    finished = [k for k in range(1, cfg.run.iterations + 1) if model_problem(run.model_dir(k)) is None]
    try:
        iterations = [int(x) for x in args.iterations.split(",")] if args.iterations else [0, *finished]
    except ValueError:
        raise C.ConfigError(f"--iterations {args.iterations!r}: expected numbers like 0,3") from None
    unfinished = [k for k in iterations if k != 0 and k not in finished]
    if unfinished:
        raise C.ConfigError(f"{run.path}: iteration(s) {unfinished} have no finished model; finished: "
                            f"{finished or 'none'} (0 = the base model)")

    try:
        with driver_lock(run, args.break_lock):  # before config.yaml is rewritten
            if new is not None:
                run._accept(new)
            run_eval_driver(run, iterations, names, lock_held=True)
    except BenchmarkError as exc:  # the benchmark's files cannot be read as the benchmark defines them
        print(f"silmm: benchmark error: {exc}", file=sys.stderr)
        return 2
    except DriverError as exc:
        print(f"silmm: {exc}", file=sys.stderr)
        return 1
    for name in names:
        for k in iterations:
            res = read_results(results_path(run.path, name, k))
            print(f"{name} iteration {k}: overall {res.overall:.4f} -> {results_path(run.path, name, k)}")
    return 0


def _cmd_plan(args: argparse.Namespace) -> int:
    """What the configured run will cost on N GPUs: unit costs from a short calibration run of its model on this
    machine (cached; silmm/plan.py), then the arithmetic per stage and iteration."""
    import json

    from silmm import plan as PL

    cfg = C.load(args.config, args.overrides, args.profile)  # every config error stops here, before calibration
    if args.gpus < 1:
        raise C.ConfigError(f"--gpus {args.gpus}: must be at least 1")
    if args.calibrate_prompts is None:
        args.calibrate_prompts = PL.default_prompts(cfg)
    if args.calibrate_prompts < 1 or args.calibrate_steps < 1:
        raise C.ConfigError("--calibrate-prompts and --calibrate-steps must be at least 1")
    if not (args.depth_scale > 0 and args.depth_scale < float("inf")):
        raise C.ConfigError(f"--depth-scale {args.depth_scale}: must be a finite number > 0")
    if args.no_calibrate and not args.unit_costs:
        raise C.ConfigError("--no-calibrate needs --unit-costs FILE (every cost given)")
    given = PL.read_unit_costs(args.unit_costs, partial=not args.no_calibrate) if args.unit_costs else None
    say = (lambda line: print(line, file=sys.stderr, flush=True)) if args.json else print
    if args.no_calibrate:
        costs = PL.UnitCosts.from_json(given, f"--unit-costs {args.unit_costs}")
        costs.source = f"--unit-costs {args.unit_costs}"
    else:
        costs = PL.calibrate(cfg, args.calibrate_prompts, args.calibrate_steps, recalibrate=args.recalibrate, say=say)
        if given:
            costs = PL.amend(costs, given, f"--unit-costs {args.unit_costs}")
    limits, source = PL.cluster_limits(cfg.executor.max_array_size)
    plan = PL.plan_run(cfg, costs, args.gpus, limits, source, args.depth_scale)
    print(json.dumps(plan.to_json(), indent=1) if args.json else PL.format_plan(plan), end="\n" if args.json else "")
    return 0


def _cmd_make_tiny(args: argparse.Namespace) -> int:
    from silmm.models import build_tiny

    if args.backend == "dreamllm":  # a released layout (not a backend): the input of `silmm convert dreamllm`
        from silmm.backends.dreamllm import build_tiny_dreamllm_released

        try:
            out = build_tiny_dreamllm_released(args.out_dir, seed=args.seed)
        except FileExistsError as exc:
            print(f"silmm make-tiny: {exc}", file=sys.stderr)
            return 2
    else:
        out = build_tiny(args.backend, args.out_dir, seed=args.seed)
    print(f"tiny {args.backend} checkpoint written to {out}")
    return 0


def _cmd_convert(args: argparse.Namespace) -> int:
    from silmm.backends.base import CheckpointError
    from silmm.backends.seed_tokenizer import ConversionError

    try:
        if args.kind == "dreamllm":
            from silmm.backends.dreamllm import convert_dreamllm

            out = convert_dreamllm(args.src, args.dst, clip=args.clip, diffusion=args.diffusion)
        else:
            from silmm.backends.seed_llama import convert_seed_llama

            out = convert_seed_llama(args.src, args.dst, llm=args.llm, tokenizer=args.tokenizer, decoder=args.decoder)
    except (CheckpointError, ConversionError, FileExistsError) as exc:  # what is wrong with the files, in a line
        print(f"silmm convert: {exc}", file=sys.stderr)
        return 2
    print(f"{args.kind} checkpoint converted to {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="silmm", description=__doc__.splitlines()[0])
    p.add_argument("--version", action="version", version=f"silmm {__version__}")
    p.add_argument("--log-level", default="INFO")
    sub = p.add_subparsers(dest="command", required=True)

    cfg = sub.add_parser("config", help="show a resolved config").add_subparsers(dest="action", required=True)
    show = cfg.add_parser("show", help="print the resolved config and its hash")
    show.add_argument("config")
    show.add_argument("overrides", nargs="*", help="key=value dotlist overrides")
    show.add_argument("--profile", action="append", default=[], help="extra YAML merged after CONFIG (cluster profile)")
    show.set_defaults(func=_cmd_config_show)

    run = sub.add_parser("run", help="create or resume a run and advance it")
    run.add_argument("config")
    run.add_argument("overrides", nargs="*", help="key=value dotlist overrides")
    run.add_argument("--profile", action="append", default=[],
                     help="extra YAML merged after CONFIG, e.g. slurm/profiles/generic_gpu.yaml (repeatable)")
    run.add_argument("--detach", action="store_true",
                     help="submit the driver itself as a Slurm job that resubmits itself until the run is done")
    run.add_argument("--break-lock", action="store_true", help="take over a driver lock left by a dead driver")
    run.set_defaults(func=_cmd_run)

    init = sub.add_parser("init", help="create (or check) the run directory without a driver and print the sbatch "
                                       "commands of one iteration (slurm/sbatch/*.sh, afterok chain)")
    init.add_argument("config")
    init.add_argument("overrides", nargs="*", help="key=value dotlist overrides")
    init.add_argument("--profile", action="append", default=[], help="extra YAML merged after CONFIG (repeatable)")
    init.add_argument("--iteration", type=int, default=None,
                      help="the iteration to print (default: the first one not finished)")
    init.set_defaults(func=_cmd_init)

    sh = sub.add_parser("shards", help="print how many shards a stage of an iteration has")
    sh.add_argument("run")
    sh.add_argument("iteration", type=int)
    sh.add_argument("stage")
    sh.add_argument("--benchmark", default="", help="eval, eval_results: the benchmark")
    sh.set_defaults(func=_cmd_shards)

    st = sub.add_parser("status", help="per iteration and stage: done / running / failed / missing")
    st.add_argument("run")
    st.set_defaults(func=_cmd_status)

    cn = sub.add_parser("cancel", help="cancel the run's submitted jobs and stop its driver")
    cn.add_argument("run")
    cn.set_defaults(func=_cmd_cancel)

    ins = sub.add_parser("inspect", help="summarise a shard or a run directory")
    ins.add_argument("path")
    ins.set_defaults(func=_cmd_inspect)

    tiny = sub.add_parser("make-tiny", help="build a tiny random checkpoint (tests, demos; no download)")
    tiny.add_argument("backend", choices=[b.value for b in C.Backend] + ["dreamllm"],
                      help="a backend's tiny checkpoint, or dreamllm: a tiny DreamLLM in the released layout")
    tiny.add_argument("out_dir")
    tiny.add_argument("--seed", type=int, default=0)
    tiny.set_defaults(func=_cmd_make_tiny)

    conv = sub.add_parser("convert", help="convert a released checkpoint into silmm's layout for its backend")
    conv.add_argument("kind", choices=["seed-llama", "dreamllm"])
    conv.add_argument("src", help="seed-llama: the directory holding seed_llama_8b_sft/ and seed_tokenizer/ "
                                  "(with seed_quantizer.pt and diffusion_model/), as the release's README arranges them; "
                                  "dreamllm: the released model directory (config.json, model*.safetensors, the "
                                  "tokenizer, dream_embedding.bin, clip_vision_embedding.bin, stable_diffusion_head.bin)")
    conv.add_argument("dst", help="the new checkpoint directory (must not exist)")
    conv.add_argument("--llm", default=None, help="the released LLaMA directory (default: SRC/seed_llama_8b_sft)")
    conv.add_argument("--tokenizer", default=None,
                      help="the released tokenizer directory (default: SRC/seed_tokenizer)")
    conv.add_argument("--decoder", default=None, help="the stable-diffusion-2-1-unclip pipeline directory "
                                                      "(default: SRC/seed_tokenizer/diffusion_model)")
    conv.add_argument("--clip", default=None, help="dreamllm: the CLIP model directory (default: the path in "
                                                   "config.json if local, else builtin openai/clip-vit-large-patch14)")
    conv.add_argument("--diffusion", default=None,
                      help="dreamllm: the Stable Diffusion directory (unet/, vae/, scheduler/ configs; default: the path "
                           "in config.json if local, else builtin stabilityai/stable-diffusion-2-1-base)")
    conv.set_defaults(func=_cmd_convert)

    rep = sub.add_parser("report", help="training metrics, self-feedback and benchmark tables of every iteration "
                                       "(report/index.md)")
    rep.add_argument("run")
    rep.set_defaults(func=_cmd_report)

    ev = sub.add_parser("eval", help="evaluate a run's models on benchmarks (missing shards only), through the "
                                     "run's executor")
    ev.add_argument("run")
    ev.add_argument("overrides", nargs="*", help="eval.* key=value overrides, e.g. eval.benchmarks.dpg_bench.path=DIR")
    ev.add_argument("--iterations", default=None,
                    help="comma-separated, 0 = the base model (default: 0 and every finished iteration)")
    ev.add_argument("--benchmarks", default=None, help="comma-separated names (default: every configured one)")
    ev.add_argument("--break-lock", action="store_true", help="take over a driver lock left by a dead driver")
    ev.set_defaults(func=_cmd_eval)

    pl = sub.add_parser("plan", help="what the run will cost on N GPUs: GPU-hours, wall time, disk, memory, model "
                                     "loads, files, arrays and Slurm resources per stage (a short calibration run "
                                     "of the model on this machine, cached)")
    pl.add_argument("config")
    pl.add_argument("overrides", nargs="*", help="key=value dotlist overrides")
    pl.add_argument("--profile", action="append", default=[], help="extra YAML merged after CONFIG (repeatable)")
    pl.add_argument("--gpus", type=int, required=True, help="GPUs the run may use at once")
    pl.add_argument("--recalibrate", action="store_true", help="measure again, ignoring the cached unit costs")
    pl.add_argument("--calibrate-prompts", type=int, default=None,
                    help="prompts of the calibration run (default: one per prompt category, at least 4)")
    pl.add_argument("--calibrate-steps", type=int, default=2, help="optimizer steps of the calibration run (default 2)")
    pl.add_argument("--depth-scale", type=float, default=1.0,
                    help="multiply the model stages' per-prompt compute by this (a reduced-depth calibration model: "
                         "real layers / calibrated layers; an approximation)")
    pl.add_argument("--unit-costs", default=None,
                    help="JSON file of unit costs (silmm plan --json's 'costs' layout) replacing the measured ones")
    pl.add_argument("--no-calibrate", action="store_true", help="use --unit-costs alone (it must give every cost)")
    pl.add_argument("--json", action="store_true", help="print the plan as JSON (progress goes to stderr)")
    pl.set_defaults(func=_cmd_plan)

    ver = sub.add_parser("verify", help="validate every shard of a run; list the bad ones")
    ver.add_argument("run")
    ver.set_defaults(func=_cmd_verify)

    gc = sub.add_parser("gc", help="remove what later stages no longer read (dry run unless --yes): progress "
                                   "sidecars, checkpoints and samples of finished iterations, moved-aside files")
    gc.add_argument("run")
    gc.add_argument("--only", default=None, help=f"comma-separated categories (default: all of "
                                                 f"{','.join(C.GC_CATEGORIES)})")
    gc.add_argument("--keep", default=None, help="comma-separated categories to leave alone")
    gc.add_argument("--yes", action="store_true", help="remove them (default: list them with their sizes)")
    gc.set_defaults(func=_cmd_gc)
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Options and overrides in any order (`silmm run CFG a=1 --profile p.yaml b=2`): argparse gives the
    `overrides` positional only the words before the first option, so the key=value words after it come back
    as extras; they are overrides too, in the order given."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
        args.overrides = [*args.overrides, *extra]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def main(argv: list[str] | None = None) -> int:
    from silmm.executors import SubmissionError
    from silmm.store import ShardError

    args = parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except C.ConfigError as exc:
        print(f"silmm: config error: {exc}", file=sys.stderr)
        return 2
    except ShardError as exc:
        print(f"silmm: shard error: {exc}", file=sys.stderr)
        return 1
    except SubmissionError as exc:  # sbatch refused a job: what Slurm said and the fix, no traceback
        print(f"silmm: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())

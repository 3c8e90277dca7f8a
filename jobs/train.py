"""Training -- one job per iteration: DPO (discrete LMMs) or KC-DPO (continuous) with LoRA on DeepSpeed ZeRO.

Reads   iter_K/pairs.h5 (this run's hash and iteration, at least one pair; otherwise a clear error), and the
        iteration's start model: model.path for iteration 1, iter_{K-1}/model after that. Continuous: the
        H_w, H_l, H_r rows pairs.h5 indexes in iter_K/samples/shard_*.h5 (each shard checked at start
        against the checksums pairs.h5 recorded: one gone or regenerated since is refused; read as float32).
Writes  iter_K/train/metrics.jsonl   one line every train.log_every steps, means since the previous line:
                                     loss, rewards/*, logps/* (discrete) or distance/* (continuous: a
                                     warning when train.gamma x distance/chosen_rejected < 1), lr,
                                     grad_norm, pairs_per_second; entropy/image_tokens, kl/reference and
                                     logps/*_drift (discrete) or distance/policy_ref (continuous); every
                                     train.eval_every steps eval/loss and eval/rewards/* on held-out prompts
        iter_K/train/tensorboard/    the same scalars, when tensorboard is installed
        iter_K/train/checkpoints/    the newest DeepSpeed checkpoint (every train.checkpoint_every steps) with
                                     silmm_manifest.json (config hash, sha256 of every file)
        iter_K/train/adapter/        the trained LoRA adapter (and dream head), safetensors
        iter_K/model/                merged weights in the input's layout, then iter_K/model/DONE, last:
                                     the next iteration's policy AND reference, loaded by the same code.

Supports  train.loss dpo / cdpo / rdpo / ipo / sft (discrete), kcdpo / sft (continuous); LoRA (train.lora.*) on the language
          model, plus the dream queries/projector (continuous); ZeRO stage train.zero_stage (2 default, 3
          gathers weights before export); AdamW, linear warm-up + cosine decay, gradient accumulation and
          clipping; fp32 on CPU, the model's bf16 on CUDA; world size from the launcher (torchrun, srun,
          submitit tasks; see silmm/distributed.py); resuming; SIGUSR2/SIGTERM -> checkpoint, then exit or
          requeue (submitit); gradient checkpointing; dropout off in the policy forward (train.policy_dropout);
          a held-out split of whole prompts; pairs read ahead by a thread (train.prefetch).
Assumes   one optimizer step = train.batch_size pairs = micro x train.grad_accum x world size, micro being
          the pairs per forward on each rank (silmm/trainer.py); a resume runs with the same world size.
          The reference values stored in pairs.h5 are used as they are (no reference forward runs); only a
          file without them (or reference="forward") makes every batch run one no-grad reference forward.

Run       in-process or through submitit: silmm.tasks.run_task(StageTask(run_dir, K, "train"))
          torchrun --standalone --nproc_per_node=2 -m jobs.train --run-dir RUN --iteration K
          srun --ntasks=4 python -m jobs.train --run RUN --iteration K
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from typing import Any

import torch
from tqdm import tqdm

from silmm import distributed
from silmm import trainer as T
from silmm.backends.base import resolve_device
from silmm.config import Loss
from silmm.models import load_backend
from silmm.progress import task_recorder
from silmm.rundir import RunDir
from silmm.seeding import derive_seed
from silmm.store import StoreOptions

log = logging.getLogger("jobs.train")


def run(run: RunDir, iteration: int, shard: int = 0, reference: str = "auto") -> dict[str, Any]:
    """Train iteration ``iteration`` of ``run`` (``shard`` is unused: one task per iteration).

    ``reference``: 'auto' uses the stored reference values when pairs.h5 has them, 'stored' requires them,
    'forward' recomputes them with the model as loaded (the benchmark's and tests' comparison)."""
    cfg, t = run.config, run.config.train
    train_dir, model_dir = run.train_dir(iteration), run.model_dir(iteration)
    if (model_dir / T.DONE).is_file():
        log.info("iteration %d: %s exists, training already done", iteration, model_dir / T.DONE)
        return {"iteration": iteration, "skipped": True, "model": str(model_dir)}

    # 1. Ranks first: the micro-batch size depends on the world size, and every later step may talk to them.
    device, _ = resolve_device(cfg.model)
    dist = distributed.init(device)
    micro = T.micro_batch_size(t.batch_size, t.grad_accum, dist.world_size)

    # 2. Pairs before the model: an empty or foreign file, or a loss that does not fit, fails in a second.
    #    Whole prompts are held out for the held-out loss; the data order covers the rest.
    pairs = T.PairsFile(run.pairs_path(iteration), run.config_hash, iteration, StoreOptions.from_config(cfg.store))
    loss = T.check_loss(cfg, pairs.family)
    ref_source = T.reference_source(reference, pairs, loss)
    train_rows, heldout = T.heldout_split(pairs.prompt_ids(), t.heldout_fraction, t.heldout_max_pairs,
                                          T.order_seed(cfg.run.seed, iteration))
    order = T.DataOrder(len(pairs), T.order_seed(cfg.run.seed, iteration), pool=train_rows)
    if len(train_rows) < t.batch_size:
        log.warning("%d training pairs < train.batch_size=%d: a batch repeats pairs", len(train_rows), t.batch_size)

    # 3. Model, LoRA, engine. One seed on every rank, so that the LoRA weights start identical everywhere.
    torch.manual_seed(derive_seed(cfg.run.seed, iteration, 0, 0, "lora-init"))
    backend = load_backend(run, iteration)
    backend.add_lora(t.lora)
    if t.gradient_checkpointing:
        backend.enable_gradient_checkpointing()
    policy = T.Policy(backend)
    dropout_off = 0 if t.policy_dropout else T.disable_dropout(policy)
    engine = T.build_engine(policy, t, micro)

    # 4. Resume from the newest checkpoint, if any; the data order and RNG follow from the step alone.
    #    Only this run's checkpoints load (its config hash and every file's sha256, checked before unpickling),
    #    and DeepSpeed unpickles them weights-only (silmm.trainer.Checkpoints).
    checkpoints = T.Checkpoints(train_dir / "checkpoints", dist.is_main, run.config_hash)
    layout = {"data_seed": order.seed, "num_pairs": len(pairs), "heldout_pairs": len(heldout),
              "batch_size": t.batch_size, "grad_accum": t.grad_accum, "world_size": dist.world_size,
              "zero_stage": t.zero_stage}
    state = checkpoints.resume(engine, layout)
    start, last_loss = (state["step"], state["loss"]) if state else (0, float("nan"))
    if start:
        log.info("resumed from %s: step %d, %d pairs consumed", checkpoints.latest(), start, state["consumed_samples"])
    log.info("iteration %d: %s on %d pairs (%d held out), %s reference, world size %d, %d pairs per forward per "
             "rank x %d accumulation, ZeRO-%d, %s, gradient checkpointing %s, dropout %s, steps %d..%d", iteration,
             T.loss_description(t, loss), len(train_rows), len(heldout), ref_source, dist.world_size, micro,
             t.grad_accum, t.zero_stage, backend.dtype, "on" if t.gradient_checkpointing else "off",
             "on" if t.policy_dropout else f"off ({dropout_off} modules)", start + 1, t.max_steps)

    # 5. The loop: grad_accum micro-batches per optimizer step on every rank; the reads run ahead in a thread.
    #    One synchronisation per step (non-finite losses, stop requests), the metrics only at logging steps.
    metrics = T.MetricsLog(train_dir / "metrics.jsonl", dist.is_main, start)
    bar = tqdm(total=t.max_steps, initial=start, desc=f"train iter {iteration}", unit="step",
               disable=not (dist.is_main and cfg.logging.progress), dynamic_ncols=True)
    schedule = (order.micro_rows(step, m, dist.rank, micro, dist.world_size, t.batch_size)
                for step in range(start, t.max_steps) for m in range(t.grad_accum))
    reads = T.Prefetcher(pairs, schedule, ref_source == "stored", t.prefetch)
    engine.train()  # what gradient checkpointing needs; dropout stays off unless train.policy_dropout
    record = task_recorder("steps", t.max_steps, start, enabled=dist.is_main)  # the driver's bar, `silmm status`
    sums, t_start, t_window, steps_window = T.MetricSums(), time.time(), time.time(), 0
    gamma_checked = False  # once per job, on the first logging step's means
    try:
        with T.StopRequest().installed() as stop:
            for step in range(start, t.max_steps):
                lr = engine.get_lr()[0]  # the rate this step uses: the scheduler moves on in engine.step()
                guard = T.StepGuard()
                for m in range(t.grad_accum):
                    batch = pairs.to_batch(reads.next(), backend.device)
                    ref = T.reference_values(policy, batch, ref_source)
                    torch.manual_seed(T.step_seed(cfg.run.seed, iteration, step, m * dist.world_size + dist.rank))
                    out = engine(batch, chosen_only=loss is Loss.sft)
                    result = T.pair_loss(t, loss, batch, out, ref)
                    engine.backward(result.loss)
                    guard.add(batch.rows, result.losses)
                    if m + 1 == t.grad_accum:  # before the update: a bad step never reaches the weights
                        stop_now = guard.check(step, stop.signum, device, checkpoints.latest(), checkpoints.root)
                    engine.step()  # DeepSpeed updates only at the accumulation boundary
                    sums.add({"loss": result.loss, **result.metric_tensors(), **T.policy_metrics(t, batch, out, ref)})
                done = step + 1
                bar.update(1)
                record.update(done)
                steps_window += 1
                log_now = done % t.log_every == 0 or done == t.max_steps or stop_now
                save_now = done % t.checkpoint_every == 0 or done == t.max_steps or stop_now
                values: dict[str, float] = {}
                if log_now:
                    values = sums.reduce(device)  # means since the last logging step
                    last_loss = values["loss"]
                    if not gamma_checked and dist.is_main and (warning := T.kcdpo_gamma_warning(t, values)):
                        log.warning("%s", warning)
                    gamma_checked = True
                    bar.set_postfix(loss=f"{last_loss:.4f}", lr=f"{lr:.2e}")
                if log_now or save_now:
                    grad_norm = T.grad_norm(engine, done, checkpoints)  # before a checkpoint: never save NaNs
                    values |= {} if grad_norm is None else {"grad_norm": grad_norm}
                if len(heldout) and (done % t.eval_every == 0 or done == t.max_steps):
                    values |= T.heldout_metrics(engine, pairs, heldout, micro, dist.rank, dist.world_size, t, loss,
                                                ref_source, backend.device)
                if log_now:
                    now = time.time()
                    rate = steps_window * t.batch_size / max(now - t_window, 1e-9)
                    metrics.write(done, {**values, "lr": lr, "pairs_per_second": rate})
                    t_window, steps_window = now, 0
                if save_now:
                    # the final step too: a crash during export resumes here and only exports again
                    tag = checkpoints.save(engine, {"step": done, "consumed_samples": done * t.batch_size,
                                                    "loss": last_loss, **layout})
                if stop_now:
                    stop.exit(done, str(checkpoints.root / tag))
    finally:
        reads.close()
        bar.close()
        metrics.close()
    seconds = time.time() - t_start
    steps_run = t.max_steps - start

    # 6. Export: adapter from the float32 master weights; the merged model merged in float32 and written in
    #    the input checkpoint's dtype, in its layout; DONE last (all ranks gather under ZeRO-3).
    engine.eval()
    info = {"iteration": iteration, "steps": t.max_steps, "loss": last_loss, "loss_function": T.loss_description(t, loss),
            "config_hash": run.config_hash, "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    try:
        T.export_model(engine, policy, t.zero_stage, train_dir / "adapter", model_dir, dist.is_main, info)
    finally:
        pairs.close()
    return {"iteration": iteration, "loss": last_loss, "steps": t.max_steps, "resumed_from": start,
            "pairs": len(train_rows), "heldout_pairs": len(heldout), "world_size": dist.world_size,
            "reference": ref_source, "loss_function": T.loss_description(t, loss),
            "pairs_per_second": round(steps_run * t.batch_size / max(seconds, 1e-9), 3),
            "train_seconds": round(seconds, 3), "model": str(model_dir)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m jobs.train", description="train one SILMM iteration "
                                "(world size from torchrun / srun / submitit)")
    # --run-dir for torchrun: its own parser reads "--run" as an abbreviation of its --run-path
    p.add_argument("--run", "--run-dir", dest="run", required=True, help="run directory (holds config.yaml)")
    p.add_argument("--iteration", type=int, required=True)
    p.add_argument("--reference", choices=T.REFERENCE_SOURCES, default="auto",
                   help="reference values: stored in pairs.h5 (auto: when present) or a forward per batch")
    args = p.parse_args(argv)
    rank = distributed.launcher_env().get("RANK", "0")
    logging.basicConfig(level=logging.INFO if rank == "0" else logging.WARNING, stream=sys.stderr,
                        format=f"%(asctime)s [rank {rank}] %(levelname)s %(name)s: %(message)s")
    try:
        stats = run(RunDir.open(args.run), args.iteration, reference=args.reference)
    except T.TrainingError as exc:
        log.error("%s", exc)
        return 1
    if rank == "0":
        print(json.dumps(stats))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    raise SystemExit(main())

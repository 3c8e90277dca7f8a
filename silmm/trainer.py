"""The pieces of preference training that ``jobs/train.py`` strings together, each small and testable.

- :class:`PairsFile` reads a validated ``pairs.h5`` batch by batch (per-pair scalars in memory; tokens and
  features fetched from disk per micro-batch), :class:`DataOrder` fixes which pairs each rank sees.
- :class:`Policy` puts the backend's trainable modules under one ``nn.Module`` for DeepSpeed and runs the
  policy forward (chosen and rejected in ONE forward for discrete LMMs).
- :func:`reference_values` takes the stored reference values, or runs the fallback reference forward.
- :func:`pair_loss` dispatches to :mod:`silmm.losses` (DPO / IPO / KC-DPO / SFT).
- :func:`deepspeed_config`, :class:`WarmupCosine`, :class:`Checkpoints`, :class:`StopRequest`,
  :class:`MetricsLog`, :func:`export_model`: the engine, its schedule, resuming, preemption, logs, export.

Batch arithmetic: one optimizer step consumes ``train.batch_size`` pairs (the global batch), whatever the
world size. Each rank runs ``train.grad_accum`` micro-batches of

    micro = train.batch_size / (train.grad_accum * world_size)      pairs per forward, per rank

and DeepSpeed averages the gradients over micro-batches and ranks, so every optimizer step follows the
mean loss over the global batch and the loss curve does not depend on the world size.
"""

from __future__ import annotations

import json
import logging
import math
import pickle
import shutil
import signal
import threading
import warnings
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import h5py
import numpy as np
import torch
from torch import nn

from silmm.backends.lora import Master
from silmm.config import CONTINUOUS_LOSSES, DISCRETE_LOSSES, IpoNormalization, Loss, SilmmConfig, TrainConfig
from silmm.distributed import all_reduce_sum, barrier
from silmm.fsutil import atomic_write_text, file_manifest, manifest_problem
from silmm.losses import (
    cdpo_loss,
    dpo_loss,
    ipo_loss,
    kcdpo_loss,
    kernel_distance,
    rdpo_loss,
    sft_continuous_loss,
    sft_discrete_loss,
)
from silmm.rundir import MODEL_DONE
from silmm.seeding import derive_seed
from silmm.store import ShardError, StoreOptions, indexed_samples, quarantine, read_shard

log = logging.getLogger(__name__)

DONE = MODEL_DONE  # written last into iter_K/model/: the driver's and `silmm inspect`'s completion marker
REFERENCE_SOURCES = ("auto", "stored", "forward")


class TrainingError(RuntimeError):
    """Training cannot go on; the message says where (step, micro-batch, pairs) and what to do."""


# ---------------------------------------------------------------------------------------- batch math
def _copies_features(path: Path, options: StoreOptions) -> bool:
    """Whether ``path`` is a pairs.h5 of the older continuous layout (matrices copied into `features`)."""
    try:
        with h5py.File(path, "r", locking=options.file_locking) as f:
            return "features" in f
    except (OSError, ValueError):
        return False


def micro_batch_size(batch_size: int, grad_accum: int, world_size: int) -> int:
    """Pairs per forward on one rank: ``batch_size = micro * grad_accum * world_size``."""
    per_step = grad_accum * world_size
    if batch_size % per_step:
        raise TrainingError(
            f"train.batch_size={batch_size} is not divisible by train.grad_accum={grad_accum} x world size "
            f"{world_size} = {per_step}: every rank needs whole micro-batches of equal size. Use a batch size "
            f"that is a multiple of {per_step}, or change grad_accum / the number of ranks.")
    return batch_size // per_step


def check_loss(cfg: SilmmConfig, family: str) -> Loss:
    """The configured loss, refused when it does not fit the backend or the pairs file's family."""
    loss = cfg.train.loss
    backend_family = "discrete" if cfg.discrete else "continuous"
    if family != backend_family:
        raise TrainingError(f"the pairs file holds {family} pairs but model.backend="
                            f"{cfg.model.backend.value} is {backend_family}: pairs from another run?")
    allowed = DISCRETE_LOSSES if cfg.discrete else CONTINUOUS_LOSSES
    if loss not in allowed:
        raise TrainingError(f"train.loss={loss.value} does not fit the {family} backend "
                            f"'{cfg.model.backend.value}'; use one of {sorted(x.value for x in allowed)}")
    return loss


# ------------------------------------------------------------------------------------------ data order
def order_seed(run_seed: int, iteration: int) -> int:
    return derive_seed(run_seed, iteration, 0, 0, "train-order")


class DataOrder:
    """Which pair each global sample index reads: a fresh permutation of the training pairs per epoch,
    seeded by (data seed, epoch). Step s consumes global samples [s*B, (s+1)*B); within it, micro-batch m of
    rank r is chunk ``m * world + r``. Depends on nothing but the seed and the rows, so a resumed run reads
    exactly what the uninterrupted one read. ``pool``: the pair rows trained on (all but the held-out
    split); None means all ``num_pairs`` rows."""

    def __init__(self, num_pairs: int, seed: int, pool: np.ndarray | None = None):
        self.pool = np.arange(num_pairs) if pool is None else np.asarray(pool, dtype=np.int64)
        self.num_pairs = len(self.pool)
        self.seed = seed
        self._cached: tuple[int, np.ndarray] | None = None  # one epoch's permutation (millions of pairs)

    def permutation(self, epoch: int) -> np.ndarray:
        if self._cached is None or self._cached[0] != epoch:
            self._cached = (epoch, np.random.default_rng([self.seed, epoch]).permutation(self.num_pairs))
        return self._cached[1]

    def rows(self, start: int, count: int) -> np.ndarray:
        """Pair rows of global samples [start, start + count)."""
        out = np.empty(count, dtype=np.int64)
        for i, g in enumerate(range(start, start + count)):
            epoch, pos = divmod(g, self.num_pairs)
            out[i] = self.pool[self.permutation(epoch)[pos]]
        return out

    def micro_rows(self, step: int, micro_step: int, rank: int, micro: int, world_size: int,
                   batch_size: int) -> np.ndarray:
        chunk = micro_step * world_size + rank
        return self.rows(step * batch_size + chunk * micro, micro)


def heldout_split(prompt_ids: np.ndarray, fraction: float, max_pairs: int, seed: int
                  ) -> tuple[np.ndarray, np.ndarray]:
    """(training rows, held-out rows) of the pairs file. Whole prompts are held out (pairs of one prompt
    share it, so a pair split would leak): each distinct prompt id draws a seeded uniform number, prompts
    below ``fraction`` are held out, fewest-first up to ``max_pairs`` pairs. At least one prompt is always
    kept for training. Depends only on the ids and the seed: a resumed run splits alike."""
    rows = np.arange(len(prompt_ids))
    if fraction <= 0 or max_pairs <= 0 or len(prompt_ids) == 0:
        return rows, rows[:0]
    ids, inverse, counts = np.unique(prompt_ids, return_inverse=True, return_counts=True)
    draw = np.random.default_rng([seed, 0x5EED]).random(len(ids))
    held = np.zeros(len(ids), dtype=bool)
    taken = 0
    for i in np.argsort(draw, kind="stable"):
        if draw[i] >= fraction or taken + counts[i] > max_pairs or held.sum() + 1 >= len(ids):
            break
        held[i] = True
        taken += counts[i]
    mask = held[inverse]
    return rows[~mask], rows[mask]


# ------------------------------------------------------------------------------------------ pairs file
@dataclass
class PairBatch:
    """One micro-batch, already on the model's device. Reference fields are None when not stored."""

    rows: np.ndarray  # pair rows in pairs.h5
    prompts: list[str]
    chosen_tokens: torch.Tensor | None = None  # [B, T]
    rejected_tokens: torch.Tensor | None = None
    chosen_ref_logps: torch.Tensor | None = None  # [B]
    rejected_ref_logps: torch.Tensor | None = None
    chosen_features: torch.Tensor | None = None  # [B, L, D]
    rejected_features: torch.Tensor | None = None
    ref_features: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.rows)


class PairsFile:
    """A validated ``pairs.h5``, read per micro-batch.

    Opening checks it through :func:`silmm.store.read_shard` (stage, config hash, iteration, structure) and
    refuses an empty file. Nothing else is loaded: each micro-batch reads its rows of every column it needs
    (continuous runs have ~100 pairs per prompt, i.e. millions of pairs; their texts alone would be GBs).

    Continuous pairs index rows of the iteration's samples shards (jobs/pairs.py): opening also checks each
    referenced shard against what pairs.h5 recorded of it (its structure, stage, iteration and the CRC32s of
    its feature and id columns: attributes only, no re-read) and keeps it open; H is read as float32 whatever
    its stored precision. A pairs.h5 of the older layout, which copied the matrices into `features`, is
    refused: re-running the pairs stage writes the current one.
    """

    def __init__(self, path: Path, config_hash: str, iteration: int, options: StoreOptions):
        self.path = Path(path)
        try:
            shard = read_shard(self.path, "pairs", config_hash, iteration, options=options, columns=())
        except ShardError as exc:
            hint = " (a pairs.h5 of the older layout that copied the feature matrices: re-run the pairs stage)" \
                if _copies_features(self.path, options) else ""
            raise TrainingError(f"cannot train: {exc}{hint}") from None
        self.num_pairs = shard.rows("pairs")
        if self.num_pairs == 0:
            raise TrainingError(f"{self.path}: holds no pairs; nothing to train on (check the scores and the "
                                "pairs.* settings, then re-run the pairs stage)")
        self._h5 = h5py.File(self.path, "r", locking=options.file_locking)
        self._samples: dict[int, h5py.File] = {}  # continuous: samples shard index -> open file
        self.family = "discrete" if "chosen_tokens" in self._h5 else "continuous"
        needed = ("chosen_tokens", "rejected_tokens") if self.family == "discrete" else (
            "samples_shard", "chosen_row", "rejected_row")
        missing = [c for c in needed if c not in self._h5]
        if missing:
            self.close()
            raise TrainingError(f"{self.path}: {self.family} pairs without {missing}")
        if self.family == "continuous":
            try:
                self._samples = self._open_samples(shard, options)
            except TrainingError:
                self.close()
                raise

    def _open_samples(self, shard: Any, options: StoreOptions) -> dict[int, h5py.File]:
        """Each samples shard pairs.h5 indexes, checked against what pair selection recorded of it
        (:func:`silmm.store.indexed_samples`) and opened; any problem is a TrainingError naming the file."""
        paths, problems = indexed_samples(shard, options)
        used = set(np.unique(self._h5["samples_shard"][:]).tolist())
        if not problems and used - set(paths):
            problems.append(f"{self.path}: pairs index samples shards {sorted(used - set(paths))} that "
                            "`extra.samples_shards` does not record (corrupt)")
        if problems:
            raise TrainingError("cannot train: " + "; ".join(problems) + ". The pairs index rows of the samples "
                                "shards, which are needed until the iteration's model is DONE: re-run the pairs "
                                "stage (after the samples stage if a shard is gone)")
        files = {i: h5py.File(p, "r", locking=options.file_locking) for i, p in sorted(paths.items())}
        if len({f["features"].shape[1:] for f in files.values()}) != 1:
            for f in files.values():
                f.close()
            raise TrainingError(f"{self.path}: its samples shards hold H of different shapes")
        return files

    def __len__(self) -> int:
        return self.num_pairs

    @property
    def has_reference(self) -> bool:
        """Whether the reference model's values were stored (then training runs no reference forward)."""
        names = ("chosen_ref_logprob", "rejected_ref_logprob") if self.family == "discrete" else ("ref_row",)
        return all(n in self._h5 for n in names)

    def close(self) -> None:
        for f in self._samples.values():
            f.close()
        self._h5.close()

    def _read(self, name: str, rows: np.ndarray) -> np.ndarray:
        """dataset[rows] for any order and repeats (h5py wants increasing, unique indices)."""
        unique, inverse = np.unique(rows, return_inverse=True)
        dset = self._h5[name]
        values = dset.asstr()[unique] if h5py.check_string_dtype(dset.dtype) else dset[unique]
        return values[inverse]

    def _read_h(self, name: str, shards: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """``name`` ('features' or 'ref_features') at (samples shard, row) of each pair, as float32 [B, L, D];
        each shard's rows read once, in increasing order (the `_read` trick)."""
        first = next(iter(self._samples.values()))[name]
        out = np.empty((len(rows), *first.shape[1:]), np.float32)
        for shard in np.unique(shards).tolist():
            mine = shards == shard
            unique, inverse = np.unique(rows[mine], return_inverse=True)
            out[mine] = self._samples[shard][name][unique][inverse]  # float16 -> float32 here
        return out

    def prompt_ids(self) -> np.ndarray:
        """The prompt id of every pair (for the held-out split): one integer column, small."""
        return self._h5["prompt_id"][:]

    def read(self, rows: np.ndarray, with_reference: bool) -> dict[str, Any]:
        """The columns of ``rows`` as numpy arrays (reading and decompression only: safe to run in the
        prefetch thread, h5py serialises its calls)."""
        out: dict[str, Any] = {"rows": rows, "text": self._read("text", rows)}
        if self.family == "discrete":
            names = ["chosen_tokens", "rejected_tokens"]
            names += ["chosen_ref_logprob", "rejected_ref_logprob"] if with_reference else []
            return out | {n: self._read(n, rows) for n in names}
        shards = self._read("samples_shard", rows)
        out["chosen_features"] = self._read_h("features", shards, self._read("chosen_row", rows))
        out["rejected_features"] = self._read_h("features", shards, self._read("rejected_row", rows))
        if with_reference:
            out["ref_features"] = self._read_h("ref_features", shards, self._read("ref_row", rows))
        return out

    @staticmethod
    def to_batch(arrays: dict[str, Any], device: torch.device) -> PairBatch:
        """What :meth:`read` returned, as tensors on ``device``."""
        def tensor(name: str, dtype: torch.dtype) -> torch.Tensor | None:
            if name not in arrays:
                return None
            t = torch.from_numpy(arrays[name])
            if device.type == "cuda":  # a pinned copy lets the transfer overlap the compute
                return t.pin_memory().to(device, non_blocking=True).to(dtype)
            return t.to(device=device, dtype=dtype)

        return PairBatch(
            rows=arrays["rows"], prompts=[str(t) for t in arrays["text"]],
            chosen_tokens=tensor("chosen_tokens", torch.long), rejected_tokens=tensor("rejected_tokens", torch.long),
            chosen_ref_logps=tensor("chosen_ref_logprob", torch.float32),
            rejected_ref_logps=tensor("rejected_ref_logprob", torch.float32),
            chosen_features=tensor("chosen_features", torch.float32),
            rejected_features=tensor("rejected_features", torch.float32),
            ref_features=tensor("ref_features", torch.float32))

    def batch(self, rows: np.ndarray, device: torch.device, with_reference: bool) -> PairBatch:
        return self.to_batch(self.read(rows, with_reference), device)


class Prefetcher:
    """Reads the pairs of the coming micro-batches in a background thread, ``depth`` ahead of the compute,
    so that reading and decompressing the next batch overlaps this one's forward and backward (torch
    releases the GIL in its kernels). The order is fixed in advance (:class:`DataOrder`), so nothing is
    read that is not used, except up to ``depth`` batches when the run stops early. depth 0 reads inline."""

    def __init__(self, pairs: PairsFile, schedule: Iterable[np.ndarray], with_reference: bool, depth: int):
        self.pairs, self.with_reference, self.depth = pairs, with_reference, depth
        self._schedule = iter(schedule)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pairs-prefetch") if depth else None
        self._queue: deque[Future] = deque()

    def _fill(self) -> None:
        while self._pool is not None and len(self._queue) < self.depth:
            rows = next(self._schedule, None)
            if rows is None:
                return
            self._queue.append(self._pool.submit(self.pairs.read, rows, self.with_reference))

    def next(self) -> dict[str, Any]:
        """The arrays of the next scheduled micro-batch (StopIteration after the last)."""
        if self._pool is None:
            return self.pairs.read(next(self._schedule), self.with_reference)
        self._fill()
        if not self._queue:
            raise StopIteration
        arrays = self._queue.popleft().result()
        self._fill()
        return arrays

    def close(self) -> None:
        if self._pool is not None:
            for f in self._queue:
                f.cancel()
            self._pool.shutdown(wait=True)
            self._pool = None


def reference_source(requested: str, pairs: PairsFile, loss: Loss) -> str:
    """'stored' (values from pairs.h5, no reference forward), 'forward' (reference() forward per batch) or
    'none' (SFT needs no reference). 'auto' picks stored when the file has the values."""
    if requested not in REFERENCE_SOURCES:
        raise TrainingError(f"reference source must be one of {REFERENCE_SOURCES}, got {requested!r}")
    if loss is Loss.sft:
        return "none"
    if requested == "stored" and not pairs.has_reference:
        raise TrainingError(f"{pairs.path}: no stored reference values; use the reference forward instead")
    if requested == "auto":
        return "stored" if pairs.has_reference else "forward"
    return requested


# ---------------------------------------------------------------------------------------------- model
def training_modules(backend: Any) -> dict[str, nn.Module]:
    """The nn.Modules that own the backend's trainable parameters (and the frozen ones they use), so that
    DeepSpeed can wrap them, cast them and, under ZeRO-3, partition them. The backend interface has no
    accessor for these, so the attribute of each family is named here."""
    if backend.family == "discrete":
        return {"model": backend.model}  # Janus: peft injects LoRA in place, so .model holds it
    return {"lmm": backend.lmm, "head": backend.head}  # dream: PeftModel(LLaVA) + queries/projector


class PolicyOut(NamedTuple):
    """What the policy forward gives (a NamedTuple: DeepSpeed walks tuples for the tensors it tracks).
    Discrete: summed log-probs of chosen (and rejected) image tokens and the per-sequence mean entropy of
    the policy over image codes (detached). Continuous: the deterministic features H."""

    chosen_logps: torch.Tensor | None = None  # [B]
    rejected_logps: torch.Tensor | None = None  # [B]
    entropy: torch.Tensor | None = None  # [B] or [2B], nats per image token, detached
    features: torch.Tensor | None = None  # [B, L, D]


class Policy(nn.Module):
    """The backend's modules under one nn.Module (what DeepSpeed wraps); ``forward`` is the policy pass.

    Discrete: chosen and rejected sequences go through ONE forward (concatenated along the batch) and the
    log-probs are summed over image positions only (the backend computes the image-code head chunk by chunk
    with a float32 log-sum-exp: no full-vocabulary logits are kept). Continuous: H for each distinct prompt
    of the batch once (top-k x bottom-k pairs share prompts), then indexed per pair.
    """

    def __init__(self, backend: Any):
        super().__init__()
        self.parts = nn.ModuleDict(training_modules(backend))
        self.backend = backend  # not an nn.Module: a plain attribute
        owned = {id(p) for p in self.parameters()}
        stray = [p.shape for p in backend.trainable_parameters() if id(p) not in owned]
        if stray:
            raise TrainingError(f"{type(backend).__name__}: {len(stray)} trainable parameters outside the modules "
                                f"DeepSpeed wraps (shapes {stray[:3]}); silmm.trainer.training_modules is stale")

    def forward(self, batch: PairBatch, chosen_only: bool = False) -> PolicyOut:
        if self.backend.family == "continuous":
            slot = {p: i for i, p in enumerate(dict.fromkeys(batch.prompts))}  # first-seen order
            index = torch.tensor([slot[p] for p in batch.prompts], device=batch.chosen_features.device)
            return PolicyOut(features=self.backend.features(list(slot))[index])
        if chosen_only:
            logps, entropy = self.backend.sequence_logprobs(batch.prompts, batch.chosen_tokens, entropy=True)
            return PolicyOut(chosen_logps=logps, entropy=entropy)
        n = len(batch)
        tokens = torch.cat([batch.chosen_tokens, batch.rejected_tokens])
        logps, entropy = self.backend.sequence_logprobs(batch.prompts + batch.prompts, tokens, entropy=True)
        return PolicyOut(logps[:n], logps[n:], entropy)

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:
        """Trainable parameters only: what a DeepSpeed checkpoint needs (the loaded model supplies the rest).
        DeepSpeed's own ``exclude_frozen_parameters`` misses tied weights (a frozen lm_head tied to the
        embeddings, 839 of 849 MB of a checkpoint at Janus-Pro-1B widths) and buffers."""
        full = super().state_dict(*args, **kwargs)
        prefix = kwargs.get("prefix", args[1] if len(args) > 1 else "")
        keep = {prefix + n for n, p in self.named_parameters(remove_duplicate=False) if p.requires_grad}
        return OrderedDict((k, v) for k, v in full.items() if k in keep)


def disable_dropout(module: nn.Module) -> int:
    """Dropout off in the policy forward, as TRL's ``disable_dropout``: p = 0 in every nn.Dropout (LoRA's
    included) and in transformers' attention modules (which read ``attention_dropout`` in training mode).
    Training mode stays on (gradient checkpointing needs it). Returns how many modules were changed."""
    changed = 0
    for m in module.modules():
        if isinstance(m, nn.Dropout) and m.p > 0:
            m.p = 0.0
            changed += 1
        rate = getattr(m, "attention_dropout", None)
        if isinstance(rate, float) and rate > 0:
            m.attention_dropout = 0.0
            changed += 1
    return changed


def reference_values(policy: Policy, batch: PairBatch, source: str) -> tuple[torch.Tensor, ...]:
    """(ref chosen, ref rejected) log-probs, or (H_r,): stored in the batch, or one no-grad forward of the
    model as loaded (``backend.reference()``: LoRA disabled, dream head as loaded)."""
    if source == "none":
        return ()
    if source == "stored":
        if policy.backend.family == "discrete":
            return batch.chosen_ref_logps, batch.rejected_ref_logps
        return (batch.ref_features,)
    with torch.no_grad(), policy.backend.reference():
        out = policy(batch)
    if out.features is not None:
        return (out.features.detach(),)
    return out.chosen_logps.detach(), out.rejected_logps.detach()


def pair_loss(t: TrainConfig, loss: Loss, batch: PairBatch, out: PolicyOut, ref: tuple[torch.Tensor, ...]):
    """The configured loss of :mod:`silmm.losses` on one micro-batch (an output with .losses/.metrics())."""
    if loss is Loss.kcdpo:
        return kcdpo_loss(out.features, ref[0], batch.chosen_features, batch.rejected_features, gamma=t.gamma,
                          aggregation=t.kernel_aggregation, distance=t.kernel_distance)
    if loss is Loss.sft:
        if out.features is not None:
            return sft_continuous_loss(out.features, batch.chosen_features, t.kernel_aggregation, t.kernel_distance)
        return sft_discrete_loss(out.chosen_logps, batch.chosen_tokens.shape[1])  # mean NLL per image token
    logps = (out.chosen_logps, out.rejected_logps, *ref)
    if loss is Loss.dpo:
        return dpo_loss(*logps, beta=t.beta)
    if loss is Loss.cdpo:
        return cdpo_loss(*logps, beta=t.beta, label_smoothing=t.label_smoothing)
    if loss is Loss.rdpo:
        return rdpo_loss(*logps, beta=t.beta, label_smoothing=t.label_smoothing)
    if t.ipo_normalization is IpoNormalization.mean:  # IPO's 1/(2 beta) target per image token, as TRL
        logps = tuple(x / batch.chosen_tokens.shape[1] for x in logps)
    return ipo_loss(*logps, beta=t.beta)


# Below this gamma x k(H_w, H_l), KC-DPO's loss cannot fall far below log 2 while H stays among its samples,
# so the optimizer walks H on, about lr per step in the pairs' direction. Measured in the continuous toy
# (README, "How large gamma must be"): at DropDiv 0.4 in all layers k(H_w, H_l) = 0.09, and with the exact
# oracle's pairs, over two iterations from 0.418 held-out alignment, gamma x k = 0.27 moved H 0.24 (cosine)
# and gave 0.291, 0.94 gave 0.317, 1.8 gave 0.402 (H 0.04), 2.7 gave 0.487 (H 0.02), 90 gave 0.466 (H
# 0.0005). The line lies between 1.8 and 2.7.
KCDPO_MIN_REACH = 2.5


def kcdpo_gamma_warning(t: TrainConfig, values: dict[str, float]) -> str | None:
    """A warning when train.gamma is too small for the features' scale (``values``: a logging step's means,
    holding ``distance/chosen_rejected``), else None. ``gamma x k(H_w, H_l)`` is about the loss's argument
    once H has moved from the reference as far as the chosen sample lies from the rejected one."""
    pair = values.get("distance/chosen_rejected")
    if pair is None or not math.isfinite(pair):
        return None
    reach = t.gamma * pair
    if reach >= KCDPO_MIN_REACH:
        return None
    suggested = f"about {KCDPO_MIN_REACH / pair:.3g}" if reach > 0 else "none helps: chosen and rejected features are equal"
    return (f"KC-DPO: train.gamma={t.gamma:g} x k(H_w, H_l)={pair:.3g} (kernel {t.kernel_aggregation.value} + "
            f"{t.kernel_distance.value}) is {reach:.3g} < {KCDPO_MIN_REACH:g}: the loss stays near log 2 unless H "
            f"moves about {1 / max(reach, 1e-12):.3g} chosen-rejected distances, so the optimizer walks H away "
            f"from its samples. A gamma that makes it {KCDPO_MIN_REACH:g}: {suggested}")


def loss_description(t: TrainConfig, loss: Loss) -> str:
    """The loss as the logs and DONE say it (the IPO normalisation included: it changes what beta means)."""
    if loss is Loss.ipo:
        return f"ipo on log-probs {'averaged over' if t.ipo_normalization is IpoNormalization.mean else 'summed over'} " \
               "the image tokens"
    if loss in (Loss.cdpo, Loss.rdpo):
        return f"{loss.value} (label-flip rate {t.label_smoothing})"
    return loss.value


def policy_metrics(t: TrainConfig, batch: PairBatch, out: PolicyOut, ref: tuple[torch.Tensor, ...]
                   ) -> dict[str, torch.Tensor]:
    """What shows collapse of diversity or drift from the reference, beside the loss's own metrics (detached
    0-dim tensors, left on the device until a logging step). Discrete: the policy's entropy over image codes
    (nats per token); the log-prob drift from the reference of chosen and rejected images; and
    ``kl/reference``, the per-token sample estimate mean(log pi_ref - log pi) over the batch's images, which
    were sampled from the reference (the iteration's start model) -- an estimate of KL(pi_ref || pi) up to
    the difference between the sampling distribution (guidance, top-p) and pi_ref itself. Continuous: the
    kernel distance k(H, H_r) of the policy's features from the reference's."""
    m: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        if out.entropy is not None:
            m["entropy/image_tokens"] = out.entropy.float().mean()
        if not ref:
            return m
        if out.features is not None:
            m["distance/policy_ref"] = kernel_distance(out.features, ref[0], t.kernel_aggregation,
                                                       t.kernel_distance).mean()
            return m
        drift_c, drift_r = out.chosen_logps - ref[0], out.rejected_logps - ref[1]
        m["logps/chosen_drift"] = drift_c.mean()
        m["logps/rejected_drift"] = drift_r.mean()
        m["kl/reference"] = -(drift_c + drift_r).mean() / (2 * batch.chosen_tokens.shape[1])
    return m


def heldout_metrics(engine: Any, pairs: PairsFile, rows: np.ndarray, micro: int, rank: int, world_size: int,
                    t: TrainConfig, loss: Loss, ref_source: str, device: torch.device) -> dict[str, float]:
    """Loss, reward accuracy and margin on the held-out pairs (no gradients). Every rank runs the same
    number of forwards (ZeRO-3 gathers weights in each one): the ranks' shares are padded with weight-0
    copies of a real row."""
    per_rank = -(-len(rows) // world_size)
    mine = rows[rank::world_size]
    weights = np.r_[np.ones(len(mine)), np.zeros(per_rank - len(mine))]
    mine = np.r_[mine, np.full(per_rank - len(mine), rows[0], dtype=np.int64)]
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # loss, accuracy, margin, count
    policy: Policy = engine.module
    with torch.no_grad():
        for start in range(0, per_rank, micro):
            batch = pairs.batch(mine[start:start + micro], device, with_reference=ref_source == "stored")
            ref = reference_values(policy, batch, ref_source)
            out = pair_loss(t, loss, batch, engine(batch, chosen_only=loss is Loss.sft), ref)
            w = torch.as_tensor(weights[start:start + micro], dtype=torch.float64, device=device)
            sums[0] += (out.losses.to(torch.float64) * w).sum()
            if hasattr(out, "chosen_rewards"):
                margin = (out.chosen_rewards - out.rejected_rewards).to(torch.float64)
                sums[1] += ((margin > 0).to(torch.float64) * w).sum()
                sums[2] += (margin * w).sum()
            sums[3] += w.sum()
    all_reduce_sum(sums)
    loss_sum, correct, margin_sum, count = sums.tolist()
    values = {"eval/loss": loss_sum / count}
    if loss is not Loss.sft:
        values |= {"eval/rewards/accuracies": correct / count, "eval/rewards/margins": margin_sum / count}
    return values


def step_seed(run_seed: int, iteration: int, step: int, chunk: int) -> int:
    """The global RNG seed of one micro-batch (LoRA dropout): resuming re-seeds, so steps after a restart
    draw what the uninterrupted run drew, without saving RNG states."""
    return derive_seed(run_seed, iteration, step, chunk, "train-step")


# --------------------------------------------------------------------------------------------- engine
@dataclass(frozen=True)
class WarmupCosine:
    """LR factor of optimizer step s (0-based): linear warm-up to 1 over ``warmup`` steps, starting at
    1/warmup (no step is wasted at lr 0), then cosine decay that would reach 0 at ``total``."""

    warmup: int
    total: int

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        progress = (step - self.warmup) / max(self.total - self.warmup, 1)
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def deepspeed_config(t: TrainConfig, micro: int, dtype: torch.dtype) -> dict[str, Any]:
    """ZeRO stage ``t.zero_stage``, torch's AdamW (no FusedAdam JIT build), clipping, accumulation;
    bf16/fp16 only when the model was loaded in that dtype (CUDA), fp32 otherwise."""
    return {
        "train_batch_size": t.batch_size,
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": t.grad_accum,
        "optimizer": {"type": "AdamW", "params": {"lr": t.lr, "betas": [0.9, 0.999], "eps": 1e-8,
                                                  "weight_decay": t.weight_decay, "torch_adam": True}},
        "gradient_clipping": t.grad_clip,
        "zero_optimization": {"stage": t.zero_stage},
        "bf16": {"enabled": dtype == torch.bfloat16},
        "fp16": {"enabled": dtype == torch.float16},
        "steps_per_print": 10**9,  # silmm logs itself
        "wall_clock_breakdown": False,
    }


def build_engine(policy: Policy, t: TrainConfig, micro: int):
    """DeepSpeed engine over the policy; the optimizer sees the backend's trainable parameters only."""
    import deepspeed

    # DeepSpeed calls torch.distributed functions that torch now marks deprecated, once per step under ZeRO-3
    warnings.filterwarnings("ignore", message=r".*torch\.distributed\.\w+`? is deprecated", category=FutureWarning)
    engine, *_ = deepspeed.initialize(
        model=policy, model_parameters=policy.backend.trainable_parameters(),
        config=deepspeed_config(t, micro, policy.backend.dtype),
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, WarmupCosine(t.warmup_steps, t.max_steps)))
    if t.zero_stage == 3 and policy.backend.family == "continuous":
        # the dream queries are read directly (the head's forward never runs): have ZeRO-3 gather them
        # whenever the policy runs
        for p in policy.backend.head.parameters():
            deepspeed.zero.register_external_parameter(policy, p)
    return engine


def grad_norm(engine: Any, step: int, checkpoints: Checkpoints) -> float | None:
    """The global gradient norm of the step just taken (None when DeepSpeed did not compute one); a
    non-finite norm stops training: the weights are now broken, so no checkpoint of them is written."""
    norm = engine.get_global_grad_norm()
    if norm is None:
        return None
    norm = float(norm)
    if not math.isfinite(norm):
        raise TrainingError(f"non-finite gradient norm at step {step}; last good checkpoint: "
                            f"{checkpoints.root / str(checkpoints.latest())}. Check the pairs or lower train.lr.")
    return norm


# ---------------------------------------------------------------------------------------- checkpoints
MANIFEST = "silmm_manifest.json"  # beside DeepSpeed's files in each step_* folder


def deepspeed_safe_globals() -> list[type]:
    """The classes DeepSpeed 0.19 pickles into its checkpoint files besides tensors and builtins, found with
    ``torch.serialization.get_unsafe_globals_in_checkpoint`` on ZeRO 0-3 checkpoints in fp32 and bf16:
    the ZeRO stage enum, the fragment addresses of ZeRO 1/2 and the loss scaler (a static one in fp32/bf16;
    fp16, CUDA only, keeps a dynamic one). None of them runs code when unpickled: their fields are set."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [ZeroStageEnum, fragment_address, LossScaler, DynamicLossScaler]


@contextmanager
def weights_only_loads() -> Iterator[None]:
    """Inside: every ``torch.load`` runs with ``weights_only=True`` and :func:`deepspeed_safe_globals` allowed.

    DeepSpeed's loader passes ``weights_only=False`` itself (its checkpoint engine, the ZeRO optimizer
    states); torch's documented ``TORCH_FORCE_WEIGHTS_ONLY_LOAD`` overrides that at every call site."""
    import os

    key, before = "TORCH_FORCE_WEIGHTS_ONLY_LOAD", os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD")
    os.environ[key] = "1"
    try:
        with torch.serialization.safe_globals(deepspeed_safe_globals()):
            yield
    finally:
        if before is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = before


class Checkpoints:
    """DeepSpeed checkpoints in ``iter_K/train/checkpoints/step_NNNNNNNN``; only the newest is kept.

    Frozen weights are left out (the loaded model supplies them): a checkpoint holds the trainable
    weights, optimizer and scheduler states, and ``client_state["silmm"]`` (step, consumed samples, data
    seed, batch layout), which a resume checks against the current run.

    Only checkpoints this run wrote are loaded, and without running pickled code:

    - after DeepSpeed's files, rank 0 writes :data:`MANIFEST` (the run's config hash, every file's size and
      sha256), then ``latest``: a step folder without a manifest is never the latest;
    - a resume checks the manifest (present, same config hash, the same files, sizes and hashes) before
      anything is unpickled; a checkpoint that fails is moved aside (``checkpoints.bad-<time>``, the
      warning names the file) and the iteration's training starts over;
    - DeepSpeed then loads under :func:`weights_only_loads`: ``weights_only=True`` with a four-class
      allowlist, for every file it reads."""

    def __init__(self, root: Path, is_main: bool, config_hash: str):
        self.root = Path(root)
        self.is_main = is_main
        self.config_hash = config_hash

    def latest(self) -> str | None:
        f = self.root / "latest"
        return f.read_text().strip() if f.is_file() else None

    def save(self, engine: Any, state: dict[str, Any]) -> str:
        tag = f"step_{state['step']:08d}"
        engine.save_checkpoint(str(self.root), tag=tag, client_state={"silmm": state}, save_latest=False,
                               exclude_frozen_parameters=True)
        barrier()  # every rank's files are written before they are hashed and an older checkpoint goes
        if self.is_main:
            folder = self.root / tag
            manifest = {"config_hash": self.config_hash, "files": file_manifest(folder, exclude=(MANIFEST,))}
            atomic_write_text(folder / MANIFEST, json.dumps(manifest, indent=1) + "\n")
            atomic_write_text(self.root / "latest", tag)
            for old in self.root.glob("step_*"):
                if old.name != tag:
                    shutil.rmtree(old, ignore_errors=True)
        return tag

    def verify(self, tag: str) -> None:
        """TrainingError naming the file unless ``tag`` is complete, unchanged and of this run."""
        folder, start_over = self.root / tag, f"delete {self.root} to start this iteration's training over"
        record = folder / MANIFEST
        try:
            manifest = json.loads(record.read_text())
            files = manifest["files"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise TrainingError(f"{record}: missing or unreadable ({exc}); the checkpoint was not written to the "
                                f"end by this run, so it is not loaded; {start_over}") from None
        if manifest.get("config_hash") != self.config_hash:
            raise TrainingError(f"{record}: written by another run (config hash {manifest.get('config_hash')}, "
                                f"this run's {self.config_hash}); only this run's checkpoints are loaded; "
                                f"{start_over}")
        extra = sorted(name for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST
                       and (name := str(p.relative_to(folder))) not in files)
        problem = manifest_problem(folder, files) or (extra and f"{folder / extra[0]}: not written by this run")
        if problem:
            raise TrainingError(f"{problem}; the checkpoint is not loaded; {start_over}")

    def resume(self, engine: Any, expected: dict[str, Any]) -> dict[str, Any] | None:
        """Load the newest checkpoint; None when there is none. Refuses one that :meth:`verify` rejects or
        of another layout."""
        tag = self.latest()
        if tag is None:
            return None
        try:
            self.verify(tag)  # before DeepSpeed unpickles anything
        except TrainingError as exc:
            # damaged or foreign: kept for inspection, never loaded; training starts over, which writes what
            # the resumed run would have (every step's data and seeds derive from the run, not the process)
            barrier()  # every rank has looked at it before rank 0 moves it
            if self.is_main:
                moved = quarantine(self.root)
                log.warning("%s\n  moved %s aside to %s; this iteration's training starts over", exc, self.root,
                            moved.name)
            barrier()
            return None
        try:
            with weights_only_loads():
                path, client = engine.load_checkpoint(str(self.root), tag=tag, load_module_strict=False)
        except pickle.UnpicklingError as exc:
            raise TrainingError(f"{self.root / tag}: holds an object outside the weights-only allowlist "
                                f"(silmm.trainer.deepspeed_safe_globals), not loaded: {exc}") from None
        if path is None:
            raise TrainingError(f"{self.root / tag}: checkpoint could not be loaded; delete {self.root} to "
                                "start this iteration's training over")
        state = client.get("silmm", {})
        wrong = {k: (state.get(k), v) for k, v in expected.items() if state.get(k) != v}
        if wrong:
            raise TrainingError(f"{self.root / tag}: written with a different layout {wrong} "
                                "(checkpoint value, now); resume with the same world size and settings, "
                                f"or delete {self.root} to start over")
        return state


# ---------------------------------------------------------------------------------------- preemption
class StopRequest:
    """SIGUSR2 / SIGTERM set a flag instead of killing the process; the loop checkpoints at the next step
    boundary and then calls :meth:`exit`.

    Under submitit the handler that was installed before ours is submitit's: calling it after the checkpoint
    runs the task's ``checkpoint()``, requeues the job and exits (rank 0); on other ranks, or without
    submitit, the process exits with 128 + the signal number."""

    SIGNALS = (signal.SIGUSR2, signal.SIGTERM)

    def __init__(self) -> None:
        self.signum = 0
        self._previous: dict[int, Any] = {}

    def _handler(self, signum: int, frame: Any) -> None:
        if not self.signum:
            log.warning("received %s: checkpointing at the next step boundary", signal.Signals(signum).name)
        self.signum = signum

    @contextmanager
    def installed(self) -> Iterator[StopRequest]:
        if threading.current_thread() is not threading.main_thread():
            yield self  # signals reach the main thread only: nothing to install
            return
        for sig in self.SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handler)
        try:
            yield self
        finally:
            for sig, previous in self._previous.items():
                signal.signal(sig, previous)

    def exit(self, step: int, where: str) -> None:
        name = signal.Signals(self.signum).name
        log.warning("stopped by %s after step %d; checkpoint %s; a restart resumes from it", name, step, where)
        previous = self._previous.get(self.signum)
        if callable(previous):
            previous(self.signum, None)  # submitit: checkpoint() + requeue + exit on rank 0
        raise SystemExit(128 + self.signum)


# -------------------------------------------------------------------------------------------- metrics
class MetricsLog:
    """Rank 0 appends one JSON line per logged step to ``metrics.jsonl`` (and TensorBoard scalars when
    ``torch.utils.tensorboard`` imports). On resume, lines after the resumed step are dropped first: they
    came from steps that are run again."""

    def __init__(self, path: Path, enabled: bool, resume_step: int):
        self.path = Path(path)
        self.enabled = enabled
        self._tb = None
        if not enabled:
            return
        if self.path.is_file():
            kept = [line for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line)["step"] <= resume_step]
            atomic_write_text(self.path, "".join(line + "\n" for line in kept))
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fh = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - held open across the loop
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # tensorboard is optional
            return
        self._tb = SummaryWriter(str(self.path.parent / "tensorboard"), purge_step=resume_step + 1)

    def write(self, step: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        self._fh.write(json.dumps({"step": step, **values}) + "\n")
        self._fh.flush()
        if self._tb is not None:
            for k, v in values.items():
                self._tb.add_scalar(k, v, step)

    def close(self) -> None:
        if self.enabled:
            self._fh.close()
            if self._tb is not None:
                self._tb.close()


class MetricSums:
    """Per-micro-batch metrics summed on the device, with no synchronisation until :meth:`reduce` at a
    logging step; then one all-reduce gives the means over every micro-batch of every rank since the last
    one (all micro-batches have the same size, so the mean of their means is the mean over the pairs)."""

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.count = 0

    def add(self, values: dict[str, torch.Tensor]) -> None:
        for k, v in values.items():
            v = v.detach().to(torch.float64)
            self.sums[k] = self.sums[k] + v if k in self.sums else v
        self.count += 1

    def reduce(self, device: torch.device) -> dict[str, float]:
        keys = sorted(self.sums)  # the same keys on every rank: the same code ran there
        vec = torch.stack([self.sums[k].to(device) for k in keys]
                          + [torch.tensor(float(self.count), dtype=torch.float64, device=device)])
        all_reduce_sum(vec)
        values = vec.tolist()
        self.sums, self.count = {}, 0
        return {k: values[i] / values[-1] for i, k in enumerate(keys)}


class StepGuard:
    """Non-finite losses and stop requests, checked ONCE per optimizer step, before the step updates the
    weights: one all-reduce of two numbers, instead of a synchronisation per micro-batch. A bad step stops
    every rank together and names the micro-batch and pair rows that gave it; the last checkpoint is kept."""

    def __init__(self) -> None:
        self._batches: list[tuple[np.ndarray, torch.Tensor]] = []

    def add(self, rows: np.ndarray, losses: torch.Tensor) -> None:
        self._batches.append((rows, ~torch.isfinite(losses.detach())))

    def check(self, step: int, stop_signum: int, device: torch.device, last_checkpoint: str | None,
              checkpoints_dir: Path) -> bool:
        """Raise TrainingError on a non-finite loss on any rank; else whether any rank asked to stop."""
        bad = torch.stack([b.sum() for _, b in self._batches]).sum().to(torch.float64) if self._batches else \
            torch.zeros((), dtype=torch.float64)
        vec = torch.stack([bad.to(device), torch.tensor(float(stop_signum > 0), dtype=torch.float64, device=device)])
        all_reduce_sum(vec)
        n_bad, stop = vec.tolist()
        if n_bad > 0:
            here = "another rank's batch"
            for m, (rows, flags) in enumerate(self._batches):
                local = np.flatnonzero(flags.cpu().numpy())
                if len(local):
                    here = f"micro-batch {m + 1}, batch of pairs.h5 rows {rows[local].tolist()}"
                    break
            kept = f"last good checkpoint: {checkpoints_dir / last_checkpoint}" if last_checkpoint else \
                "no checkpoint was written yet"
            raise TrainingError(f"non-finite loss at step {step + 1} ({here}); {kept}. Check those pairs' "
                                "stored reference values and features, or lower train.lr.")
        self._batches = []
        return stop > 0


# --------------------------------------------------------------------------------------------- export
@contextmanager
def gathered(engine: Any, zero_stage: int) -> Iterator[None]:
    """Under ZeRO-3 every rank holds a slice of each weight: gather them all (every rank takes part)
    before anything reads or writes them; ZeRO 0-2 keep whole weights on every rank."""
    if zero_stage != 3:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(list(engine.module.parameters()), modifier_rank=None):
        yield


def master_weights(policy: Policy) -> Master:
    """How to read each trainable parameter's float32 value for the export: DeepSpeed's float32 master copy
    where it keeps one (bf16 training, ZeRO 1-3; gathered across ranks), else the parameter itself. Every
    rank must call this (under ZeRO-3 it gathers)."""
    from deepspeed.utils import safe_get_full_fp32_param

    masters = {}
    for p in policy.backend.trainable_parameters():
        full = safe_get_full_fp32_param(p)
        if full is not None:
            masters[id(p)] = full.detach().float()

    def master(p: nn.Parameter) -> torch.Tensor:
        value = masters.get(id(p))
        return value.to(p.device) if value is not None else p.detach().float()

    return master


def export_model(engine: Any, policy: Policy, zero_stage: int, adapter_dir: Path, model_dir: Path,
                 is_main: bool, done_info: dict[str, Any], log_fn: Callable[[str], None] = log.info) -> None:
    """Adapter (float32, from the optimizer's master weights) to ``adapter_dir``; merged weights (merged in
    float32, stored in the input checkpoint's dtype) to ``model_dir`` in the input's layout; ``DONE`` last."""
    backend = policy.backend
    master = master_weights(policy)
    with gathered(engine, zero_stage):
        if is_main:
            shutil.rmtree(adapter_dir, ignore_errors=True)
            backend.save_adapter(adapter_dir, master)
            if model_dir.exists():  # a partial export of an earlier attempt (no DONE, or we would not be here)
                shutil.rmtree(model_dir)
            backend.merge_and_save(model_dir, master)
            # every file with its size and sha256: the driver and `silmm verify` check them, so a damaged
            # model is moved aside and retrained instead of loaded by the next iteration
            done_info = {**done_info, "files": file_manifest(model_dir)}
            atomic_write_text(model_dir / DONE, json.dumps(done_info, indent=2) + "\n")
            log_fn(f"wrote adapter {adapter_dir} and merged model {model_dir}")
    barrier()

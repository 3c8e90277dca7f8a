"""Stage 2 -- diverse samples for one shard: N samples per prompt, decoded, with reference values.

Reads   iter_K/prompts/shard_NNNNN.h5; the iteration's starting model (= this iteration's reference)
Writes  iter_K/samples/shard_NNNNN.h5: per sample its seed, the visual tokens (discrete) or feature
        matrix H (continuous) exactly as sampled, the decoded image as PNG, and the reference values
        training needs -- log pi_ref(z|x) per sample (discrete) or H_r per prompt (continuous) -- so the
        training job runs no reference forward at all.

Continuous H and H_r are stored in `store.features_dtype` (float16 by default: half the bytes, relative
error <= 2^-11; README "Storage at paper scale"). H is rounded to that precision right after sampling,
so the image decoded here, the one the scores stage re-decodes and the H training reads are the same
values. A value beyond float16's range (|x| > 65504) stops the task naming the prompt: never clipped.

Every sample's seed derives from (run seed, iteration, prompt id, sample index); prompts are processed
in groups of `sharding.flush_every`, all samples of a group batched `sampling.batch_size` at a time, so
a task resumed after preemption forms exactly the batches the uninterrupted task formed.
Run directly: python -m jobs.samples --run RUN --iteration K --shard I
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch

from silmm.config import FeaturesDtype, ImageStorage
from silmm.images import to_png
from silmm.models import load_backend
from silmm.rundir import RunDir
from silmm.seeding import decode_seed, derive_seed
from silmm.store import ShardError
from silmm.tasks import open_writer, progress, read_input

log = logging.getLogger("jobs.samples")


def run(run: RunDir, iteration: int, shard: int) -> dict[str, Any]:
    cfg, s = run.config, run.config.sampling
    prompts = read_input(run, iteration, "prompts", shard)
    ids, texts = [int(i) for i in prompts["prompt_id"]], list(prompts["text"])
    writer = open_writer(run, iteration, "samples", shard, prompts.meta.shard_count)
    todo = [k for k, pid in enumerate(ids) if pid not in writer.done]
    if not todo:
        writer.finish()
        return {"prompts": len(ids), "computed": 0}

    backend = load_backend(run, iteration)  # the iteration's start model: policy and reference alike
    n, store_images = s.samples_per_prompt, s.store_images is ImageStorage.all
    groups = [todo[i: i + cfg.sharding.flush_every] for i in range(0, len(todo), cfg.sharding.flush_every)]
    for group in progress(groups, len(groups), f"samples shard {shard} ({n}/prompt)", cfg.logging.progress):
        jobs = [(k, j) for k in group for j in range(n)]  # (prompt row, sample index)
        sample_seeds = [derive_seed(cfg.run.seed, iteration, ids[k], j, "sample") for k, j in jobs]
        decode_seeds = [decode_seed(cfg.run.seed, iteration, ids[k], j, s.decoder_noise.value) for k, j in jobs]
        values, images, ref_logprobs = [], [], []
        for b in range(0, len(jobs), s.batch_size):
            batch_prompts = [texts[k] for k, _ in jobs[b: b + s.batch_size]]
            z = backend.sample(batch_prompts, sample_seeds[b: b + s.batch_size])
            if backend.family == "continuous":  # decode and store the values training will read
                z = torch.from_numpy(stored_features(z, cfg.store.features_dtype, batch_prompts, writer.path))
            values.append(z)
            if store_images:
                images.extend(backend.decode(z, decode_seeds[b: b + s.batch_size]))
            if backend.family == "discrete":
                with torch.no_grad(), backend.reference():
                    ref_logprobs.append(backend.sequence_logprobs(batch_prompts, z).float().cpu())
        z_all = torch.cat(values)
        if backend.family == "discrete":
            ref_all = torch.cat(ref_logprobs).numpy()
        if backend.family == "continuous":
            with torch.no_grad(), backend.reference():
                ref_features = stored_features(backend.features([texts[k] for k in group]),
                                               cfg.store.features_dtype, [texts[k] for k in group], writer.path)
        for g, k in enumerate(group):
            rows = slice(g * n, (g + 1) * n)
            record: dict[str, Any] = {
                "prompt_id": [ids[k]] * n, "sample_index": list(range(n)), "seed": sample_seeds[rows],
                "image_png": [to_png(im) for im in images[rows]] if store_images else [b""] * n,
            }
            if backend.family == "discrete":
                record["tokens"] = z_all[rows].cpu().numpy().astype(np.int64)
                record["ref_logprob"] = ref_all[rows]
            else:
                record["features"] = z_all[rows].numpy().astype(cfg.store.features_dtype.value)  # exact
                record["ref_prompt_id"] = [ids[k]]
                record["ref_features"] = ref_features[g: g + 1].astype(cfg.store.features_dtype.value)
            writer.add(ids[k], record)
    writer.meta.extra.update(samples_per_prompt=n, family=backend.family, images=s.store_images.value)
    path = writer.finish()
    log.info("wrote %d samples of %d prompts to %s", len(ids) * n, len(ids), path)
    return {"prompts": len(ids), "computed": len(todo), "samples": len(todo) * n}


def stored_features(x: torch.Tensor, dtype: FeaturesDtype, prompts: list[str], where: object) -> np.ndarray:
    """``x`` [B, L, D] rounded to the storage precision and back to float32 (float32: unchanged). A value
    float16 cannot hold refuses the task, naming the prompt of its row: clipping would change H unseen."""
    out = x.detach().float().cpu().numpy()
    if dtype is FeaturesDtype.float32:
        return out
    limit = float(np.finfo(np.float16).max)
    beyond = np.abs(out) > limit  # NaN compares False: a non-finite H is stored as it came
    if beyond.any():
        row = int(np.argwhere(beyond)[0][0])
        raise ShardError(f"{where}: prompt {prompts[row]!r}: feature value {out[beyond][0]:.6g} beyond float16's "
                         f"range (|x| <= {limit:g}); set store.features_dtype=float32 for this model")
    return out.astype(np.float16).astype(np.float32)


if __name__ == "__main__":
    from jobs.common import main

    raise SystemExit(main("samples"))

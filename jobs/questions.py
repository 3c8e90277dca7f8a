"""Stage 3 -- self-questioning for one shard: yes/no questions for every prompt.

Reads   iter_K/prompts/shard_NNNNN.h5
Writes  iter_K/questions/shard_NNNNN.h5: per prompt its questions (flattened) and a fallback flag

`questions.method=self` (the paper): the model splits each prompt into atomic concepts and relations
from in-context examples and writes one question per unit; output with no usable question falls back
to Prompt-Q for that prompt, and the fallback is recorded. `prompt_q` and `phrase_q` are the paper's
baselines and need no model. Resumable: progress is flushed every `sharding.flush_every` prompts.
Run directly: python -m jobs.questions --run RUN --iteration K --shard I
"""

from __future__ import annotations

import logging
from typing import Any

from silmm import questions as Q
from silmm.config import QuestionMethod
from silmm.models import load_judge
from silmm.rundir import RunDir
from silmm.seeding import derive_seed
from silmm.tasks import open_writer, progress, read_input

log = logging.getLogger("jobs.questions")


def run(run: RunDir, iteration: int, shard: int) -> dict[str, Any]:
    cfg, qcfg = run.config, run.config.questions
    prompts = read_input(run, iteration, "prompts", shard)
    ids, texts = [int(i) for i in prompts["prompt_id"]], list(prompts["text"])
    writer = open_writer(run, iteration, "questions", shard, prompts.meta.shard_count)
    todo = [k for k, pid in enumerate(ids) if pid not in writer.done]

    backend = load_judge(run, iteration) if qcfg.method is QuestionMethod.self and todo else None
    examples = Q.load_examples(qcfg.icl_examples)
    fallbacks = 0
    # batches never straddle a flush boundary, so a resumed task sees the batches the first one saw
    step = min(qcfg.batch_size, cfg.sharding.flush_every)
    batches = [todo[i: i + step] for i in range(0, len(todo), step)]
    for batch in progress(batches, len(batches), f"questions shard {shard}", cfg.logging.progress):
        if backend is not None:
            outputs = backend.write_text([Q.question_request(texts[k], examples) for k in batch],
                                         [derive_seed(cfg.run.seed, iteration, ids[k], 0, "question") for k in batch],
                                         max_new_tokens=qcfg.max_new_tokens, temperature=qcfg.temperature)
        for j, k in enumerate(batch):
            if qcfg.method is QuestionMethod.prompt_q:
                qs, fallback = Q.prompt_q(texts[k]), False
            elif qcfg.method is QuestionMethod.phrase_q:
                qs, fallback = Q.phrase_q(texts[k], qcfg.max_questions), False
            else:
                qs = Q.parse_questions(outputs[j], qcfg.max_questions)
                fallback = not qs
                qs = qs or Q.prompt_q(texts[k])
            fallbacks += fallback
            writer.add(ids[k], {"prompt_id": [ids[k]], "question_count": [len(qs)], "fallback": [fallback],
                                "question": qs})
    writer.meta.extra.update(method=qcfg.method.value)
    path = writer.finish()
    log.info("wrote questions for %d prompts to %s (%d fell back to Prompt-Q this run)", len(ids), path, fallbacks)
    return {"prompts": len(ids), "computed": len(todo), "fallbacks": fallbacks}


if __name__ == "__main__":
    from jobs.common import main

    raise SystemExit(main("questions"))

"""Structured configuration: dataclasses checked by omegaconf, loaded from YAML plus dotlist overrides.

Family-dependent defaults (samples per prompt, pair k, loss, learning rate, warm-up, steps) are ``None``
in the schema and filled by :func:`resolve` from the backend, so a frozen run config always holds the
concrete values that were used. Every error is a :class:`ConfigError` that names the file (or the
command-line override) and the key at fault; the CLI turns it into exit status 2 before anything is
written or submitted.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import os
import re
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException


class ConfigError(ValueError):
    """A config problem, already phrased for the user (file, key, what is wrong)."""


# --------------------------------------------------------------------------------------------- enums
class Backend(str, Enum):
    janus = "janus"  # discrete visual tokens (Janus / Janus-Pro)
    dream = "dream"  # continuous features, DreamLLM-style (LLaVA + dream queries + diffusion decoder)
    fusion = "fusion"  # discrete, early fusion: one causal LM over words and VQ image codes (Chameleon/Emu3 form)
    emu3 = "emu3"  # discrete: Emu3 (Emu3ForConditionalGeneration), constrained decoding of its image-token grid
    seed_llama = "seed_llama"  # discrete: SEED-LLaMA (LLaMA + 32 SEED image tokens per image, unCLIP decoder)


DISCRETE_BACKENDS = {Backend.janus, Backend.fusion, Backend.emu3, Backend.seed_llama}


class Dtype(str, Enum):
    auto = "auto"  # bf16 on CUDA, fp32 on CPU
    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"


class Device(str, Enum):
    auto = "auto"  # CUDA when present, else CPU
    cpu = "cpu"
    cuda = "cuda"


class PromptSource(str, Enum):
    generate = "generate"  # the LMM writes vocabulary + templates + in-context prompts
    toy = "toy"  # the toy world's templates (colour binding, counting, spatial), held-out combinations excluded
    files = "files"  # one prompt per line, or a folder of T2I-CompBench-style category files


class OverlongPolicy(str, Enum):
    truncate = "truncate"
    reject = "reject"


class Diversity(str, Enum):
    dropdiv = "dropdiv"  # dropout after the MLPs of chosen layers, active while sampling
    noisy_queries = "noisy_queries"  # Gaussian noise on the dream queries (paper's ablation)


class DecoderNoise(str, Enum):
    per_sample = "per_sample"  # each sample's own decoder noise
    # one noise per prompt: a prompt's images differ only by their features, so a preference pair compares
    # features, which KC-DPO trains (common random numbers)
    per_prompt = "per_prompt"
    # one noise for the whole run (training samples of every iteration and evaluation alike): the decoder is a
    # deterministic function of the features, so every difference between images is a difference in H, and
    # what KC-DPO teaches is measured on the same decoder (the continuous toy's errors then live in H)
    fixed = "fixed"


class ToyQuestionStyle(str, Enum):
    named = "named"  # the paper's decomposition: the named objects, attributes, counts and relations
    exhaustive = "exhaustive"  # plus "Are there exactly N objects?": catches objects the prompt does not name


class ToyLayout(str, Enum):
    random = "random"  # objects in random cells
    canonical = "canonical"  # objects in fixed cells: the prompt decides the scene but for colours it leaves open


class DropDivPlacement(str, Enum):
    last = "last"  # the last `dropdiv_layers` layers (the paper's choice)
    first_half = "first_half"
    second_half = "second_half"
    all = "all"


class ImageStorage(str, Enum):
    all = "all"
    none = "none"
    best_worst = "best_worst"


class QuestionMethod(str, Enum):
    self = "self"  # the LMM decomposes the prompt (the paper's method)
    prompt_q = "prompt_q"  # the prompt itself as one question
    phrase_q = "phrase_q"  # one question per noun phrase


class FeedbackMethod(str, Enum):
    vqa = "vqa"  # mean over questions of p(yes) - p(no)  (paper Eq. 1)
    ratio_yes = "ratio_yes"  # fraction of questions answered "yes"
    random = "random"  # random score (ablation control)
    # a registered scorer (feedback.scorer: an external judge, or the toy's exact oracle) scores each sample
    # instead of the model itself. Not self-improvement, a deviation from the paper: the control that tells
    # what the learner can learn apart from how well the model judges
    scorer = "scorer"


class Judge(str, Enum):
    policy = "policy"  # the iteration's start model writes the questions and answers them (paper)
    base = "base"  # the model at model.path always does: judging stays as it was at iteration 0


class Loss(str, Enum):
    dpo = "dpo"  # sigmoid DPO (Rafailov et al. 2023; SILMM Eq. 2)
    cdpo = "cdpo"  # conservative DPO: labels flipped with probability train.label_smoothing
    rdpo = "rdpo"  # robust DPO (Chowdhury et al. 2024): unbiased under label noise train.label_smoothing
    ipo = "ipo"  # IPO (Azar et al. 2023), on log-probs normalised by train.ipo_normalization
    kcdpo = "kcdpo"
    sft = "sft"


DISCRETE_LOSSES = {Loss.dpo, Loss.cdpo, Loss.rdpo, Loss.ipo, Loss.sft}
NOISY_LABEL_LOSSES = {Loss.cdpo, Loss.rdpo}
CONTINUOUS_LOSSES = {Loss.kcdpo, Loss.sft}


class IpoNormalization(str, Enum):
    mean = "mean"  # log-probs averaged over the image tokens (TRL's IPO, the IPO paper's setting)
    sum = "sum"  # summed log-probs: IPO's 1/(2 beta) target then applies to the whole image


class KernelAggregation(str, Enum):
    none = "none"
    avgpool = "avgpool"
    maxpool = "maxpool"


class KernelDistance(str, Enum):
    euclidean = "euclidean"  # squared Frobenius distance
    cosine = "cosine"


class LogprobMode(str, Enum):
    conditional = "conditional"  # log pi(z | x) of the text-conditioned branch
    cfg = "cfg"  # log-probs of the classifier-free-guidance mixed logits used when sampling


class ExecutorKind(str, Enum):
    local = "local"  # submitit's local executor (the embedded default)
    debug = "debug"  # in-process, for stepping through with a debugger
    slurm = "slurm"


# what `silmm gc` (silmm/gc.py) and store.gc_after_iteration may remove, once an iteration's model is finished
GC_CATEGORIES = ("progress", "checkpoints", "samples", "bad")


class FeaturesDtype(str, Enum):
    float16 = "float16"  # half the bytes; |x| > 65504 is refused by name, never clipped
    float32 = "float32"


class Compression(str, Enum):
    gzip = "gzip"
    lzf = "lzf"
    none = "none"


# ------------------------------------------------------------------------------------------- groups
@dataclass
class RunConfig:
    name: str = "tiny"
    root: str = "shards"  # runs live in <root>/<name>
    seed: int = 0
    iterations: int = 1


@dataclass
class ModelConfig:
    backend: Backend = Backend.janus
    path: str = ""  # a local checkpoint directory (real weights or `silmm make-tiny`)
    build_tiny_if_missing: bool = False  # tiny configs: create the checkpoint when `path` is absent
    dtype: Dtype = Dtype.auto
    device: Device = Device.auto
    trust_remote_code: bool = False


@dataclass
class PromptsConfig:
    source: PromptSource = PromptSource.generate
    files: str | None = None  # a .txt file (one prompt a line) or a folder of *.txt category files, for source=files
    # source=files: file name -> category, e.g. {prompts.txt: complex}; a file not listed takes the category
    # in its name, T2I-CompBench style (color_val.txt -> color); a category that is neither is an error
    file_categories: dict[str, str] = field(default_factory=dict)
    # source=files: sha256 (16 hex digits) of each prompt file, filled when the config is loaded, not by
    # hand. Part of the config hash: a run refuses prompt files edited under it
    files_sha256: dict[str, str] = field(default_factory=dict)
    # prompts per iteration (paper: 16k); for files: drawn at random per category as `categories` says,
    # every prompt of a category that has fewer than its share (so at most all the files hold)
    count: int = 16000
    # share of each category among the prompts (normalised)
    categories: dict[str, float] = field(
        default_factory=lambda: {
            "color": 1.0, "shape": 1.0, "texture": 1.0, "spatial": 1.0, "3d_spatial": 1.0,
            "numeracy": 1.0, "non_spatial": 1.0, "complex": 1.0,
        }
    )
    max_tokens: int = 77
    overlong: OverlongPolicy = OverlongPolicy.truncate
    icl_examples: str | None = None  # YAML file of in-context examples per category (None: built-in)
    vocabulary_temperature: float = 1.0
    batch_size: int = 8


@dataclass
class SamplingConfig:
    samples_per_prompt: int | None = None  # None: 10 discrete / 30 continuous (paper)
    batch_size: int = 8  # samples per forward; results are reproducible for a fixed batch size
    # discrete
    temperature: float = 1.0
    top_p: float = 0.95
    top_k: int = 0  # 0 = off
    guidance_scale: float = 5.0  # classifier-free guidance; Janus needs > 1
    # emu3: the image grid in tokens (8 pixels each), written into the prompt; 0 = Emu3's default 90 x 90
    image_height: int = 0
    image_width: int = 0
    # continuous
    diversity: Diversity = Diversity.dropdiv
    dropdiv_rate: float = 0.1
    dropdiv_placement: DropDivPlacement = DropDivPlacement.last
    dropdiv_layers: int = 4  # for placement=last
    query_noise_std: float = 0.1  # for diversity=noisy_queries
    decoder_steps: int = 25
    decoder_guidance_scale: float = 3.0
    decoder_noise: DecoderNoise = DecoderNoise.per_sample  # the training samples' decoder noise (see DecoderNoise)
    # storage of decoded images in sample shards
    store_images: ImageStorage = ImageStorage.all


@dataclass
class QuestionsConfig:
    method: QuestionMethod = QuestionMethod.self
    max_questions: int = 8
    max_new_tokens: int = 96
    temperature: float = 0.0  # 0 = greedy
    icl_examples: str | None = None  # YAML file of (prompt, questions) examples (None: built-in)
    batch_size: int = 8


@dataclass
class FeedbackConfig:
    method: FeedbackMethod = FeedbackMethod.vqa
    batch_size: int = 16  # (image, question) pairs per forward
    # Which model judges (questions + answers). `base` keeps iteration 0's judge: a small model whose
    # generation and understanding share every weight can lose its judging to the DPO updates (issue #7)
    judge: Judge = Judge.policy
    # A separate checkpoint of the same backend that writes the questions and answers them in every iteration
    # (Emu3 releases generation and understanding as two models: Emu3-Gen judged by Emu3-Chat). Not pure
    # self-improvement: a deviation from the paper, part of the run's hash (the path, not the weights).
    judge_path: str | None = None
    # method=scorer: the scorer's name (silmm.eval.scorers, as eval.benchmarks.*.scorer); one that only scores
    # some benchmarks gives feedback on prompts whose prompts.source is one of them (the toy's oracle: toy)
    scorer: str | None = None


@dataclass
class PairsConfig:
    top_k: int | None = None  # chosen: the best k samples; None: 1 discrete / 10 continuous
    bottom_k: int | None = None  # rejected: the worst k; None: same as top_k
    rejected_ranks: list[int] | None = None  # [first, last] 1-based ranks (paper Table 7), e.g. [20, 30]
    min_score_gap: float = 0.0


@dataclass
class LoraConfig:
    r: int = 32
    alpha: int = 32
    dropout: float = 0.05
    # the language model only: vision tower, VQ model and decoder stay frozen
    target_regex: str = (
        r".*(language_model|text_model)\.layers\.\d+\."
        r"(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)"
    )


@dataclass
class TrainConfig:
    loss: Loss | None = None  # None: dpo discrete / kcdpo continuous
    beta: float = 0.2  # DPO
    gamma: float = 3.0  # KC-DPO
    label_smoothing: float = 0.0  # cdpo / rdpo: the assumed probability eps that a preference is flipped
    ipo_normalization: IpoNormalization = IpoNormalization.mean
    kernel_aggregation: KernelAggregation = KernelAggregation.avgpool
    kernel_distance: KernelDistance = KernelDistance.cosine
    logprob_mode: LogprobMode = LogprobMode.conditional
    lora: LoraConfig = field(default_factory=LoraConfig)
    lr: float | None = None  # None: 5e-5 discrete / 8e-6 continuous
    warmup_steps: int | None = None  # None: 100 / 200
    max_steps: int | None = None  # None: 1000 / 2000
    batch_size: int = 32
    grad_accum: int = 4
    grad_clip: float = 1.0
    weight_decay: float = 0.0
    zero_stage: int = 2
    log_every: int = 10
    checkpoint_every: int = 100
    # Dropout (LoRA's and the model's) in the policy forward. Off by default, as TRL's disable_dropout:
    # the stored reference values come from a dropout-free forward, so dropout would add noise to every
    # DPO margin that the reference never had.
    policy_dropout: bool = False
    # Recompute activations in backward: ~1/num_layers of the activation memory for ~1.3x the compute.
    # On by default (7B models need it on 80 GB GPUs); the tiny and toy configs switch it off.
    gradient_checkpointing: bool = True
    # A held-out split of the pairs (whole prompts, chosen by hash) for a loss/accuracy every eval_every steps
    heldout_fraction: float = 0.02
    heldout_max_pairs: int = 256
    eval_every: int = 50
    prefetch: int = 2  # micro-batches read ahead of the compute by a background thread (0: off)


@dataclass
class StageResources:
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    gpus_per_node: int = 0
    cpus_per_task: int = 1
    mem_gb: float = 4.0
    time_min: int = 60
    nodes: int = 1
    tasks_per_node: int = 1
    array_parallelism: int = 64
    shards_per_task: int = 1  # shards one array task works through, loading the model once
    constraint: str | None = None
    additional_parameters: dict[str, Any] = field(default_factory=dict)
    setup: list[str] = field(default_factory=list)  # e.g. "module load cuda", "source env/bin/activate"


STAGES = ("pretrain", "prompts", "questions", "samples", "scores", "pairs", "train", "evaluate", "eval", "eval_results",
          "driver")  # driver: --detach job; eval, eval_results: benchmark evaluation (jobs/eval.py, jobs/eval_results.py)


@dataclass
class ExecutorConfig:
    kind: ExecutorKind = ExecutorKind.local
    max_array_size: int = 1000
    retries: int = 2
    signal_delay_s: int = 120  # --signal=USR2@delay: time to checkpoint before the limit
    poll_interval_s: float = 5.0
    local_parallelism: int = 1  # local executor: tasks running at once (each loads a model)
    default: StageResources = field(default_factory=StageResources)
    # per-stage overrides of `default`: only the keys given (checked against StageResources)
    stages: dict[str, dict[str, Any]] = field(default_factory=dict)


@dataclass
class ShardingConfig:
    prompts_per_shard: int = 64
    flush_every: int = 4  # prompts between progress flushes inside a shard task


@dataclass
class StoreConfig:
    compression: Compression = Compression.gzip
    compression_level: int = 1
    file_locking: bool = True  # False for NFS/Lustre mounts that refuse HDF5 locks
    # continuous feature matrices H in sample shards (the bulk of a continuous run's bytes)
    features_dtype: FeaturesDtype = FeaturesDtype.float16
    # what the driver removes once an iteration's model is finished (the categories of `silmm gc`); [] keeps all
    gc_after_iteration: list[str] = field(default_factory=list)


@dataclass
class LoggingConfig:
    progress: bool = True  # progress bars in task logs (the log level is the CLI's --log-level)


@dataclass
class ToyPretrainConfig:
    """Pretraining of the toy early-fusion LMM on the toy world (jobs/pretrain.py); cached at model.path."""

    steps: int = 2400
    batch_size: int = 48  # per task kind and step: text->image, yes/no answers (and a quarter: questions)
    lr: float = 2e-3
    warmup_steps: int = 100
    hidden: int = 128
    layers: int = 4
    heads: int = 4
    # share of text->image examples whose image misses the prompt (a wrong colour, count, shape or
    # relation), as captions of web images often do: the pretrained generator is imperfect by design,
    # while its yes/no answers are trained on exact labels
    caption_noise: float = 0.35  # the discrete toy's; the continuous toy has toy.continuous.caption_noise
    distractor_p: float = 0.3  # chance of an extra object of an unmentioned shape
    checkpoint_every: int = 200
    seed: int = 0
    threads: int = 0  # torch threads (0: leave torch's default)


@dataclass
class ToyContinuousConfig:
    """The continuous toy LMM (model.backend: dream; silmm/toy/continuous.py): what toy.pretrain does not size.
    toy.pretrain's hidden, layers, heads, steps, batch_size, lr and seed apply to it too."""

    num_queries: int = 8  # dream queries: H is [num_queries, toy.pretrain.hidden]
    cross_attention_dim: int = 64  # the UNet's conditioning width (the projector's output)
    unet_channels: int = 32  # the UNet's first block (the second has twice as many)
    vision_hidden: int = 64  # the CLIP vision tower
    # transformer layers whose output LLaVA reads (the tower has one more: LLaVA reads layer -2); 0: the patch
    # embeddings themselves, one per cell, as the discrete toy's one code per cell (2 layers answered colour and
    # count questions 66% right after 3000 steps)
    vision_layers: int = 0
    vae_steps: int = 600  # phase 1: the VAE learns the designed cell codes
    vae_lr: float = 2e-3
    generate_weight: float = 5.0  # weight of the diffusion loss against the text losses sharing the LLM
    uncond_p: float = 0.1  # share of emptied prompts in generation batches (classifier-free guidance)
    answer_pixel_noise: float = 4.0  # std (0-255 scale) of pixel noise on answer images: decoded images are inexact
    # Where the generation examples put objects. With random cells a prompt has hundreds of right images and
    # the 3000-step UNet learnt to read almost nothing from H (its images met their own prompt 0.036 of the
    # time, another prompt 0.021); with fixed cells it learns to follow the prompt (README, issue #20).
    layout: ToyLayout = ToyLayout.canonical
    # share of generation examples whose image misses the prompt (toy.pretrain.caption_noise is the discrete
    # toy's). The decoder, not H, then decides which images miss: held-out images met their prompt 0.625 of
    # the time at 0, 0.219 at 0.1, and at the discrete toy's 0.35 H was all but ignored
    caption_noise: float = 0.0


@dataclass
class BenchmarkConfig:
    """One benchmark of `silmm eval` (silmm/eval/benchmarks/<name>.py), read from a local copy."""

    path: str | None = None  # the benchmark's repository or files on disk (never downloaded at run time)
    images_per_prompt: int | None = None  # None: the benchmark's own default (T2I-CompBench 10, DPG 4, ...)
    scorer: str = "self"  # self: the LMM's own yes/no VQA; oracle: the toy world's exact oracle
    max_prompts: int | None = None  # None: the whole set; fewer makes a smoke test, and results say so
    overlong: OverlongPolicy = OverlongPolicy.reject  # a prompt longer than the model's context: error / cut


@dataclass
class ExpertsConfig:
    """Checkpoint directories of the `expert` scorer's judges (transformers `from_pretrained`, no network).
    Only the roles a configured benchmark needs are required (silmm/eval/scorers/expert.py)."""

    vqa: str | None = None  # BlipForQuestionAnswering (T2I-CompBench uses blip-vqa-capfilt-large)
    clip: str | None = None  # CLIPModel ViT-B/32: T2I-CompBench's CLIPScore
    clip_large: str | None = None  # CLIPModel ViT-L/14: GenEval's colour classifier
    detector: str | None = None  # Owlv2ForObjectDetection: stands in for T2I-CompBench's UniDet
    depth: str | None = None  # DPTForDepthEstimation: T2I-CompBench's 3D spatial
    segmentation: str | None = None  # Mask2FormerForUniversalSegmentation (COCO instance): GenEval
    # TIFA maps a free-form answer to the nearest choice with sentence embeddings (all-mpnet-base-v2, any
    # AutoModel); without it the VQA model's likelihood of each choice decides (results.json says which)
    sbert: str | None = None


@dataclass
class EvalConfig:
    """Benchmark evaluation (jobs/eval.py): which benchmarks, when, and how the work is sharded. Not part
    of the run's config hash (it cannot change training); eval shards and results record their own."""

    benchmarks: dict[str, BenchmarkConfig] = field(default_factory=dict)  # name -> settings; listed = on
    experts: ExpertsConfig = field(default_factory=ExpertsConfig)
    after_each_iteration: bool = False  # the driver evaluates the base model and every finished iteration
    prompts_per_shard: int = 32
    batch_size: int = 8  # images per forward


@dataclass
class ToyConfig:
    """The toy world (silmm/toy): prompts, a pretrained toy LMM and the exact oracle's evaluation."""

    enabled: bool = False
    held_out_fraction: float = 0.2  # share of prompt combinations kept for evaluation only
    eval_prompts: int = 96  # held-out prompts scored by the oracle after every iteration (and before)
    eval_samples: int = 4  # images per evaluation prompt
    grid_prompts: int = 6  # held-out prompts shown in the report's image grid
    # what the toy LMM's self-questions ask (silmm/toy/world.py: self_checks); the oracle is the same for both
    question_style: ToyQuestionStyle = ToyQuestionStyle.named
    pretrain: ToyPretrainConfig = field(default_factory=ToyPretrainConfig)
    continuous: ToyContinuousConfig = field(default_factory=ToyContinuousConfig)  # model.backend: dream


@dataclass
class SilmmConfig:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    prompts: PromptsConfig = field(default_factory=PromptsConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    questions: QuestionsConfig = field(default_factory=QuestionsConfig)
    feedback: FeedbackConfig = field(default_factory=FeedbackConfig)
    pairs: PairsConfig = field(default_factory=PairsConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    executor: ExecutorConfig = field(default_factory=ExecutorConfig)
    sharding: ShardingConfig = field(default_factory=ShardingConfig)
    store: StoreConfig = field(default_factory=StoreConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    toy: ToyConfig = field(default_factory=ToyConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    @property
    def discrete(self) -> bool:
        return self.model.backend in DISCRETE_BACKENDS

    @property
    def num_shards(self) -> int:
        return math.ceil(self.prompts.count / self.sharding.prompts_per_shard)

    def resources(self, stage: str) -> StageResources:
        """The resources of one stage: `executor.default` with that stage's overrides on top."""
        merged = OmegaConf.merge(OmegaConf.structured(self.executor.default), self.executor.stages.get(stage, {}))
        return OmegaConf.to_object(merged)


# Keys whose values cannot change what a run computes: they may differ when a run is re-opened
# and are left out of the config hash. (run.iterations: a run can be extended by more iterations.)
MUTABLE_PREFIXES = ("executor", "logging", "store.file_locking", "store.gc_after_iteration", "run.root", "run.name", "run.iterations", "eval")

# Keys that nothing read, removed from the schema: a config that sets one is told so; a frozen config.yaml
# of an older run still opens (they were all outside the config hash).
REMOVED_KEYS = {"logging.level": "nothing read it; the log level is the command's --log-level option"}


# Keys added after runs existed, with the value that means "as before": at that value a key is left out of
# the config hash, so older configs keep their hash and their runs stay open.
# Literal values, not the dataclasses' defaults: changing a default later must not change the hash of a run
# whose frozen config holds the old one (it could no longer be re-opened).
HASH_DEFAULTS: dict[str, Any] = {
    "toy.question_style": "named", "sampling.decoder_noise": "per_sample", "feedback.scorer": None,
    **{f"toy.continuous.{k}": v for k, v in {
        "num_queries": 8, "cross_attention_dim": 64, "unet_channels": 32, "vision_hidden": 64, "vision_layers": 0,
        "vae_steps": 600, "vae_lr": 0.002, "generate_weight": 5.0, "uncond_p": 0.1, "answer_pixel_noise": 4.0,
        "layout": "canonical", "caption_noise": 0.0}.items()}}


def _drop_removed(tree: DictConfig) -> DictConfig:
    if not isinstance(tree, DictConfig):
        return tree  # not a config at all: the merge says so
    for key in REMOVED_KEYS:
        parent_key, _, leaf = key.rpartition(".")
        parent = OmegaConf.select(tree, parent_key) if parent_key else tree
        if isinstance(parent, DictConfig) and leaf in parent:
            del parent[leaf]
    return tree


def _refuse_removed(keys, source: str) -> None:
    for key in keys:
        if key in REMOVED_KEYS:
            raise ConfigError(f"{source}: key '{key}': was removed ({REMOVED_KEYS[key]}); delete it")


# ------------------------------------------------------------------------------------------ loading
def _wrap(exc: OmegaConfBaseException, source: str) -> ConfigError:
    key = getattr(exc, "full_key", None) or "?"
    # omegaconf's message repeats the key and a "full_key:" block; keep the first line only
    msg = str(exc).split("\n")[0].strip()
    return ConfigError(f"{source}: key '{key}': {msg}")


@functools.lru_cache(maxsize=1)
def _schema() -> DictConfig:
    """The schema as an omegaconf config, built once: building it is half the time of a load."""
    return OmegaConf.structured(SilmmConfig)


def load(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = (),
         profiles: list[str] | tuple[str, ...] = (), frozen: bool = False) -> SilmmConfig:
    """Schema <- YAML file <- profile files (e.g. a cluster's executor section) <- dotlist overrides,
    then :func:`resolve` and :func:`validate`. `frozen`: `path` is a run's own config.yaml, where keys
    removed since the run was created are dropped (elsewhere they are refused)."""
    cfg = _schema()  # never modified: every merge below returns a new config
    origins: dict[str, str] = {}  # key -> where its value came from, for error messages
    for source in ([path] if path is not None else []) + list(profiles):
        source = Path(source)
        if not source.is_file():
            raise ConfigError(f"{source}: config file not found")
        try:
            loaded = OmegaConf.load(source)
        except Exception as exc:  # yaml syntax errors come in several types
            raise ConfigError(f"{source}: not valid YAML: {exc}") from exc
        if not isinstance(loaded, DictConfig):
            raise ConfigError(f"{source}: the top level must be a mapping of config groups")
        if frozen and str(source) == str(path):
            _drop_removed(loaded)
        _refuse_removed(flatten(OmegaConf.to_container(loaded)), str(source))
        try:
            cfg = OmegaConf.merge(cfg, loaded)
        except OmegaConfBaseException as exc:
            raise _wrap(exc, str(source)) from exc
        origins.update(dict.fromkeys(flatten(OmegaConf.to_container(loaded)), str(source)))
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"command-line override '{item}': expected key=value")
        _refuse_removed([item.split("=", 1)[0].strip()], f"command-line override '{item}'")
        try:
            cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist([item]))
        except OmegaConfBaseException as exc:
            raise _wrap(exc, f"command-line override '{item}'") from exc
        origins[item.split("=", 1)[0].strip()] = f"command-line override '{item}'"
    source = str(path) if path is not None else "defaults"
    try:
        obj: SilmmConfig = OmegaConf.to_object(cfg)
    except OmegaConfBaseException as exc:  # a mandatory value left missing, a bad interpolation
        raise _wrap(exc, source) from exc
    # a run's own config.yaml keeps its paths as recorded (absolute since they are made so; relative in runs
    # created before, which keep their config hash); every other path is made absolute here
    keep = {k for k, v in origins.items() if frozen and v == str(path)}
    make_paths_absolute(obj, keep)
    obj = resolve(obj)
    validate(obj, source, origins=origins)
    return obj


def path_keys(cfg: SilmmConfig) -> list[str]:
    """The keys that name files or directories: jobs read them from wherever they start."""
    keys = ["run.root", "model.path", "prompts.files", "prompts.icl_examples", "questions.icl_examples",
            "feedback.judge_path"]
    keys += [f"eval.benchmarks.{name}.path" for name in cfg.eval.benchmarks]
    keys += [f"eval.experts.{f.name}" for f in dataclasses.fields(ExpertsConfig)]
    return keys


def _get(cfg: Any, key: str) -> Any:
    for part in key.split("."):
        cfg = cfg[part] if isinstance(cfg, dict) else getattr(cfg, part)
    return cfg


def _set(cfg: Any, key: str, value: Any) -> None:
    parent_key, _, leaf = key.rpartition(".")
    parent = _get(cfg, parent_key)
    if isinstance(parent, dict):
        parent[leaf] = value
    else:
        setattr(parent, leaf, value)


def make_paths_absolute(cfg: SilmmConfig, keep: set[str] | frozenset[str] = frozenset()) -> None:
    """Every path key (:func:`path_keys`) except those in `keep` made absolute against the current directory
    (`~` expanded), so that a frozen config names the same files from any directory a job starts in. The
    same command from the same directory gives the same paths, hence the same config hash."""
    for key in path_keys(cfg):
        value = _get(cfg, key)
        if key not in keep and value:
            _set(cfg, key, os.path.abspath(os.path.expanduser(value)))


def keep_run_paths(run_cfg: SilmmConfig, new: SilmmConfig) -> None:
    """A run created before paths were made absolute recorded them relative (and hashed them so): where `new`
    gives the same path made absolute from the current directory, `new` takes the run's recorded value, so
    the run re-opens as the same run (same hash) from the directory it was created in."""
    for key in path_keys(new):
        try:
            old = _get(run_cfg, key)
        except (KeyError, AttributeError):  # a benchmark the run's config does not list
            continue
        value = _get(new, key)
        if old and value and not os.path.isabs(old) and os.path.abspath(os.path.expanduser(old)) == value:
            _set(new, key, old)


def from_yaml_text(text: str, source: str) -> SilmmConfig:
    """Load a frozen config (a run's config.yaml) without resolving or checking paths again."""
    try:
        cfg = OmegaConf.merge(_schema(), _drop_removed(OmegaConf.create(text)))
        return OmegaConf.to_object(cfg)
    except OmegaConfBaseException as exc:
        raise _wrap(exc, source) from exc


def resolve(cfg: SilmmConfig) -> SilmmConfig:
    """Fill the family-dependent defaults from the paper (SILMM, App. 9)."""
    discrete = cfg.discrete
    s, p, t = cfg.sampling, cfg.pairs, cfg.train
    if s.samples_per_prompt is None:
        s.samples_per_prompt = 10 if discrete else 30
    if p.top_k is None:
        p.top_k = 1 if discrete else 10
    if p.bottom_k is None:
        p.bottom_k = p.top_k
    if t.loss is None:
        t.loss = Loss.dpo if discrete else Loss.kcdpo
    if t.lr is None:
        t.lr = 5e-5 if discrete else 8e-6
    if t.warmup_steps is None:
        t.warmup_steps = 100 if discrete else 200
    if t.max_steps is None:
        t.max_steps = 1000 if discrete else 2000
    pr = cfg.prompts
    if pr.source is PromptSource.files and pr.files and Path(pr.files).exists():
        from silmm.prompts import PromptFileError, files_digest

        try:  # the files become part of the run's identity (config hash)
            pr.files_sha256 = files_digest(pr.files)
        except PromptFileError:
            pass  # no prompt files there: validate() says so, naming the key
    return cfg


def validate(cfg: SilmmConfig, source: str, check_paths: bool = True,
             origins: dict[str, str] | None = None) -> None:
    """Checks that omegaconf's types cannot express. Raises ConfigError naming the key and its source."""
    origins = origins or {}

    def where(key: str) -> str:
        """The file or override that set `key`, one of its sub-keys, or the group holding it."""
        if key in origins:
            return origins[key]
        below = next((v for k, v in origins.items() if k.startswith(key + ".")), None)
        if below is not None:
            return below
        parts = key.split(".")
        above = (".".join(parts[:i]) for i in range(len(parts) - 1, 0, -1))
        return next((origins[k] for k in above if k in origins), source)

    def fail(key: str, msg: str) -> None:
        raise ConfigError(f"{where(key)}: key '{key}': {msg}")

    def positive(key: str, value: float) -> None:
        if value <= 0:
            fail(key, f"must be > 0, got {value}")

    def at_least(key: str, value: float, low: float) -> None:
        if value < low:
            fail(key, f"must be >= {low}, got {value}")

    def rate(key: str, value: float) -> None:  # dropout rates and probabilities
        if not 0 <= value < 1:
            fail(key, f"must be in [0, 1), got {value}")

    # Generic: NaN or infinity anywhere (it passes every comparison below); every batch size > 0.
    for key, value in _leaves(cfg):
        if isinstance(value, float) and not math.isfinite(value):
            fail(key, f"must be a finite number, got {value}")
        if key.rpartition(".")[2].endswith("batch_size") and value is not None:
            positive(key, value)

    r = cfg.run
    positive("run.iterations", r.iterations)
    if not 0 <= r.seed < 2**63:
        fail("run.seed", f"must be in [0, 2^63), got {r.seed}")
    if not _RUN_NAME.fullmatch(r.name) or ".." in r.name:
        fail("run.name", f"must be a plain name of letters, digits and '_', '.', '-' (not starting with '.', at most "
             f"128 characters): it names the run's directory and its Slurm jobs; got {r.name!r}")
    if not r.root or _CONTROL.search(r.root) or "%" in r.root:
        fail("run.root", f"must be a directory path without control characters or '%' (Slurm reads '%' in log "
             f"paths as a pattern), got {r.root!r}")
    if check_paths:
        problem = _root_problem(Path(r.root), Path(r.root) / r.name)
        if problem:
            fail("run.root", problem)
    _validate_executor(cfg, fail, positive)  # early: the train checks below read the stage resources
    if not cfg.model.path:
        fail("model.path", "is required: a checkpoint directory (make one with `silmm make-tiny`)")
    if check_paths and not (cfg.model.build_tiny_if_missing or cfg.toy.enabled) and not Path(cfg.model.path).is_dir():
        fail("model.path", f"checkpoint directory {cfg.model.path} does not exist")
    p = cfg.prompts
    positive("prompts.count", p.count)
    positive("prompts.max_tokens", p.max_tokens)
    positive("prompts.vocabulary_temperature", p.vocabulary_temperature)
    if not p.categories or any(w < 0 for w in p.categories.values()) or sum(p.categories.values()) <= 0:
        fail("prompts.categories", "needs at least one category with a positive weight, none negative")
    from silmm import prompts as P

    unknown = sorted(set(p.categories) - set(P.CATEGORIES))
    if unknown:
        fail("prompts.categories", f"unknown categories {unknown}; known: {', '.join(P.CATEGORIES)}")
    if p.source is PromptSource.files:
        if not p.files:
            fail("prompts.files", "is required when prompts.source=files")
        if check_paths and not Path(p.files).exists():
            fail("prompts.files", f"{p.files} does not exist")
        if check_paths:
            try:  # known categories, at least one prompt to draw: stop before anything is written or submitted
                P.check_prompt_source(p)
            except P.PromptFileError as exc:
                fail("prompts.files", str(exc))
    elif p.file_categories:
        fail("prompts.file_categories", f"maps prompt files to categories, for prompts.source=files only "
             f"(source is {p.source.value})")

    s = cfg.sampling
    if s.samples_per_prompt < 2:
        fail("sampling.samples_per_prompt", f"needs at least 2 samples to form a pair, got {s.samples_per_prompt}")
    positive("sampling.temperature", s.temperature)
    if not 0 < s.top_p <= 1:
        fail("sampling.top_p", f"must be in (0, 1], got {s.top_p}")
    if s.guidance_scale < 1.0:
        fail("sampling.guidance_scale", f"must be >= 1 (1 = no classifier-free guidance), got {s.guidance_scale}")
    if s.top_k < 0:
        fail("sampling.top_k", f"must be >= 0 (0 = off), got {s.top_k}")
    if cfg.model.backend is Backend.janus and s.guidance_scale <= 1.0:
        fail("sampling.guidance_scale", f"Janus image generation needs > 1, got {s.guidance_scale}")
    if cfg.model.backend is Backend.seed_llama and s.guidance_scale != 1.0:
        fail("sampling.guidance_scale", f"SEED-LLaMA samples without classifier-free guidance (its released "
             f"inference has none); set it to 1, got {s.guidance_scale}")
    if s.image_height < 0 or s.image_width < 0 or (s.image_height == 0) != (s.image_width == 0):
        given = "sampling.image_width" if s.image_width and not s.image_height < 0 else "sampling.image_height"
        fail(given, f"image_height and image_width are both > 0 (tokens) or both 0 (the model's default), got "
             f"{s.image_height} x {s.image_width}")
    if s.image_height and cfg.model.backend is not Backend.emu3:
        fail("sampling.image_height", f"sets the Emu3 image grid; backend '{cfg.model.backend.value}' fixes its own")
    rate("sampling.dropdiv_rate", s.dropdiv_rate)
    positive("sampling.dropdiv_layers", s.dropdiv_layers)
    positive("sampling.decoder_steps", s.decoder_steps)
    if s.decoder_guidance_scale < 1.0:
        fail("sampling.decoder_guidance_scale", f"must be >= 1 (1 = no classifier-free guidance), got "
             f"{s.decoder_guidance_scale}")
    at_least("sampling.query_noise_std", s.query_noise_std, 0)

    if check_paths:  # the in-context example files: read now, not by the first task that needs them
        _check_icl_files(cfg, fail)
    positive("questions.max_questions", cfg.questions.max_questions)
    positive("questions.max_new_tokens", cfg.questions.max_new_tokens)
    at_least("questions.temperature", cfg.questions.temperature, 0)  # 0 = greedy
    fb = cfg.feedback
    if fb.judge_path is not None and fb.judge is Judge.base:
        fail("feedback.judge", "'base' would be ignored: feedback.judge_path is set, and that checkpoint judges "
             "every iteration; set one of the two")
    if fb.judge_path is not None and check_paths and not Path(fb.judge_path).is_dir():
        fail("feedback.judge_path", f"checkpoint directory {fb.judge_path} does not exist")
    _validate_feedback_scorer(cfg, fail)

    pr = cfg.pairs
    for key, k in (("pairs.top_k", pr.top_k), ("pairs.bottom_k", pr.bottom_k)):
        positive(key, k)
        if k > s.samples_per_prompt:
            fail(key, f"{k} is more than sampling.samples_per_prompt ({s.samples_per_prompt}): a prompt has only "
                 f"that many samples to rank")
    if pr.rejected_ranks is not None:
        r = pr.rejected_ranks
        if len(r) != 2 or not 1 <= r[0] <= r[1] <= s.samples_per_prompt:
            fail("pairs.rejected_ranks", f"must be [first, last] with 1 <= first <= last <= "
                 f"sampling.samples_per_prompt ({s.samples_per_prompt}), got {list(r)}")
    if pr.min_score_gap < 0:
        fail("pairs.min_score_gap", f"must be >= 0, got {pr.min_score_gap}")

    t = cfg.train
    allowed = DISCRETE_LOSSES if cfg.discrete else CONTINUOUS_LOSSES
    if t.loss not in allowed:
        family = "discrete" if cfg.discrete else "continuous"
        fail("train.loss", f"'{t.loss.value}' does not fit the {family} backend "
             f"'{cfg.model.backend.value}'; use one of {sorted(x.value for x in allowed)}")
    positive("train.lr", t.lr)
    positive("train.max_steps", t.max_steps)
    positive("train.grad_accum", t.grad_accum)
    world, how = train_world_size(cfg)
    if t.batch_size % (t.grad_accum * world):
        per_step = t.grad_accum * world
        fail("train.batch_size", f"{t.batch_size} is not divisible by train.grad_accum ({t.grad_accum}) x the "
             f"train job's world size ({world}: {how}) = {per_step}: every rank needs whole micro-batches of "
             f"equal size; use a multiple of {per_step}, or change train.grad_accum / the train resources")
    positive("train.beta", t.beta)
    positive("train.gamma", t.gamma)
    at_least("train.grad_clip", t.grad_clip, 0)  # 0 = no clipping
    at_least("train.weight_decay", t.weight_decay, 0)
    positive("train.lora.r", t.lora.r)
    positive("train.lora.alpha", t.lora.alpha)
    rate("train.lora.dropout", t.lora.dropout)
    try:
        re.compile(t.lora.target_regex)
    except re.error as exc:
        fail("train.lora.target_regex", f"not a regular expression: {exc}")
    if t.warmup_steps < 0 or t.warmup_steps > t.max_steps:
        fail("train.warmup_steps", f"must be in [0, train.max_steps={t.max_steps}], got {t.warmup_steps}")
    if t.loss in NOISY_LABEL_LOSSES:
        if not 0 < t.label_smoothing < 0.5:
            fail("train.label_smoothing", f"train.loss={t.loss.value} needs a label-flip rate in (0, 0.5), "
                 f"got {t.label_smoothing}")
    elif t.label_smoothing != 0:
        fail("train.label_smoothing", f"is only used by train.loss=cdpo (conservative DPO, what TRL calls "
             f"label smoothing) or rdpo (robust DPO); train.loss={t.loss.value} would ignore "
             f"{t.label_smoothing}")
    positive("train.log_every", t.log_every)
    positive("train.checkpoint_every", t.checkpoint_every)
    positive("train.eval_every", t.eval_every)
    if not 0 <= t.heldout_fraction < 0.5:
        fail("train.heldout_fraction", f"must be in [0, 0.5), got {t.heldout_fraction}")
    if t.heldout_max_pairs < 0:
        fail("train.heldout_max_pairs", f"must be >= 0, got {t.heldout_max_pairs}")
    if t.prefetch < 0:
        fail("train.prefetch", f"must be >= 0 (0 = off), got {t.prefetch}")
    if t.zero_stage not in (0, 1, 2, 3):
        fail("train.zero_stage", f"must be 0, 1, 2 or 3, got {t.zero_stage}")

    toy, tp = cfg.toy, cfg.toy.pretrain
    if toy.enabled and cfg.model.backend not in (Backend.fusion, Backend.dream):
        fail("model.backend", f"the toy world's LMM is an early-fusion model ('fusion') or, continuous, a "
             f"DreamLLM-form one ('dream'); got '{cfg.model.backend.value}'")
    if not 0 < toy.held_out_fraction < 1:
        fail("toy.held_out_fraction", f"must be in (0, 1), got {toy.held_out_fraction}")
    for key in ("eval_prompts", "eval_samples", "grid_prompts", "pretrain.steps", "pretrain.lr", "pretrain.hidden",
                "pretrain.layers", "pretrain.heads", "pretrain.checkpoint_every"):
        obj = toy
        for part in key.split("."):
            obj = getattr(obj, part)
        positive(f"toy.{key}", obj)
    if tp.hidden % tp.heads:
        fail("toy.pretrain.heads", f"must divide toy.pretrain.hidden ({tp.hidden}) into equal attention heads, "
             f"got {tp.heads}")
    at_least("toy.pretrain.warmup_steps", tp.warmup_steps, 0)  # may exceed steps: configs/toy_smoke.yaml's does
    tc = toy.continuous
    for key in ("num_queries", "cross_attention_dim", "unet_channels", "vision_hidden", "vae_lr", "generate_weight"):
        positive(f"toy.continuous.{key}", getattr(tc, key))
    at_least("toy.continuous.vae_steps", tc.vae_steps, 0)
    at_least("toy.continuous.vision_layers", tc.vision_layers, 0)
    at_least("toy.continuous.answer_pixel_noise", tc.answer_pixel_noise, 0)
    rate("toy.continuous.uncond_p", tc.uncond_p)
    rate("toy.continuous.caption_noise", tc.caption_noise)
    if tc.unet_channels % 16:
        fail("toy.continuous.unet_channels", f"must be a multiple of 16 (its norm groups), got {tc.unet_channels}")
    if tc.vision_hidden % 4:
        fail("toy.continuous.vision_hidden", f"must be a multiple of 4 (its heads), got {tc.vision_hidden}")
    rate("toy.pretrain.caption_noise", tp.caption_noise)
    rate("toy.pretrain.distractor_p", tp.distractor_p)
    if not 0 <= tp.seed < 2**63:
        fail("toy.pretrain.seed", f"must be in [0, 2^63), got {tp.seed}")
    at_least("toy.pretrain.threads", tp.threads, 0)  # 0 = torch's default
    if p.source is PromptSource.toy:
        if not toy.enabled:
            fail("prompts.source", "'toy' prompts need toy.enabled=true")
        unknown = sorted(c for c, w in p.categories.items() if w > 0 and c not in ("color", "numeracy", "spatial"))
        if unknown:
            fail("prompts.categories", f"toy prompts have categories color, numeracy, spatial; got {unknown}")

    _validate_eval(cfg, fail, positive, check_paths)
    positive("sharding.prompts_per_shard", cfg.sharding.prompts_per_shard)
    positive("sharding.flush_every", cfg.sharding.flush_every)
    if cfg.store.compression is Compression.gzip and not 0 <= cfg.store.compression_level <= 9:
        fail("store.compression_level", f"gzip levels are 0-9, got {cfg.store.compression_level}")
    unknown = [c for c in cfg.store.gc_after_iteration if c not in GC_CATEGORIES]
    if unknown:
        fail("store.gc_after_iteration", f"unknown categories {unknown}; known: {list(GC_CATEGORIES)}")


# Strings that reach an sbatch line. submitit shell-quotes values (not option names), but a newline still
# starts a new line of the script: only the characters Slurm itself accepts pass.
_RUN_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")  # a directory and part of every job name
_SLURM_NAME = re.compile(r"[A-Za-z0-9_.,-]+")  # partition, account, qos (comma-separated lists allowed)
_SLURM_CONSTRAINT = re.compile(r"[A-Za-z0-9_.:,&|\[\]*()!-]+")  # features with Slurm's operators &|[]*()!
_SLURM_VALUE = re.compile(r"[A-Za-z0-9_.:,@/+=%\[\]-]+")  # additional_parameters values (gres, mail-user, ...)
_SLURM_OPTION = re.compile(r"[A-Za-z][A-Za-z0-9_-]*")  # additional_parameters keys (sbatch long options)
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
# sbatch options that silmm or submitit set themselves: given again in additional_parameters they would
# silently replace the stage's resources, or the log paths and array layout the driver reads.
_OWNED_OPTIONS = {
    "job-name": "silmm names the jobs", "time": "time_min", "nodes": "nodes", "ntasks-per-node": "tasks_per_node",
    "cpus-per-task": "cpus_per_task", "mem": "mem_gb", "gpus-per-node": "gpus_per_node", "partition": "partition",
    "account": "account", "qos": "qos", "constraint": "constraint", "signal": "executor.signal_delay_s",
    "output": "submitit's log path", "error": "submitit's log path", "open-mode": "submitit's log files",
    "array": "silmm's arrays over shards", "wrap": "submitit's job script",
}
MAX_TIME_MIN = 365 * 24 * 60
DRIVER_TIME_CAP_MIN = 24 * 60  # the detached driver resubmits itself at least once a day (driver.submit_detached)


def _leaves(value: Any, key: str = ""):
    """(dotted key, value) of every leaf of a config tree: dataclass fields, dict entries, list items."""
    if dataclasses.is_dataclass(value):
        for f in dataclasses.fields(value):
            yield from _leaves(getattr(value, f.name), f"{key}.{f.name}" if key else f.name)
    elif isinstance(value, dict):
        for k, v in value.items():
            yield from _leaves(v, f"{key}.{k}")
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            yield from _leaves(v, f"{key}.{i}")
    else:
        yield key, value


def _check_icl_files(cfg: SilmmConfig, fail) -> None:
    from silmm import prompts as P
    from silmm import questions as Q

    for key, path in (("prompts.icl_examples", cfg.prompts.icl_examples),
                      ("questions.icl_examples", cfg.questions.icl_examples)):
        if path is None:
            continue
        if not Path(path).is_file():
            fail(key, f"{path} is not a file")
        try:
            if key == "questions.icl_examples":
                Q.load_examples(path)
                continue
            data = OmegaConf.to_container(OmegaConf.load(path))  # as jobs/prompts.py reads it
        except Exception as exc:  # YAML errors come in several types
            fail(key, f"{path}: {exc}")
        missing = [c for c in P.ICL_CATEGORIES if not (isinstance(data, dict) and data.get(c))]
        if missing:
            fail(key, f"{path}: needs a list of examples for each of {missing}")


def _root_problem(root: Path, run_path: Path) -> str | None:
    """Why runs cannot live under `root` (None: they can). Nothing is created here."""
    if run_path.exists() and not run_path.is_dir():
        return f"{run_path} exists and is not a directory (change run.root or run.name)"
    existing = next((p for p in (root, *root.absolute().parents) if p.exists()), None)
    if existing is None:
        return f"{root}: no existing parent directory"
    if not existing.is_dir():
        return f"{existing} is not a directory" + ("" if existing == root else f": {root} cannot be created")
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"directory {existing} is not writable" + ("" if existing == root else f": {root} cannot be created")
    return None


def train_world_size(cfg: SilmmConfig) -> tuple[int, str]:
    """Ranks of the train job and how they follow from the config (jobs/train.py: batch = micro x accum x world)."""
    kind = cfg.executor.kind
    if kind is ExecutorKind.debug:
        return 1, "executor.kind=debug trains in one process"
    res = cfg.resources("train")
    if kind is ExecutorKind.local:
        return res.tasks_per_node, f"tasks_per_node={res.tasks_per_node} of the train stage, one node (executor.kind=local)"
    return (res.nodes * res.tasks_per_node,
            f"nodes={res.nodes} x tasks_per_node={res.tasks_per_node} of the train stage (executor.default / "
            f"executor.stages.train)")


def _validate_executor(cfg: SilmmConfig, fail, positive) -> None:
    """`executor.*`: the stage names and override keys, then the resources of `default` and of every stage
    as merged (what reaches sbatch or the local executor); an error names the key that set the value."""
    e = cfg.executor
    positive("executor.max_array_size", e.max_array_size)
    positive("executor.local_parallelism", e.local_parallelism)
    positive("executor.poll_interval_s", e.poll_interval_s)
    if e.retries < 0:
        fail("executor.retries", f"must be >= 0, got {e.retries}")
    if e.signal_delay_s < 0:
        fail("executor.signal_delay_s", f"must be >= 0, got {e.signal_delay_s}")
    for stage, override in e.stages.items():
        if stage not in STAGES:
            fail(f"executor.stages.{stage}", f"unknown stage; stages are {list(STAGES)}")
        if override is not None and not isinstance(override, dict):
            fail(f"executor.stages.{stage}", f"must be a mapping of resource keys, got {override!r}")
        try:
            OmegaConf.merge(OmegaConf.structured(StageResources), override or {})
        except OmegaConfBaseException as exc:
            fail(f"executor.stages.{stage}.{getattr(exc, 'full_key', '?')}", str(exc).split("\n")[0])
    for stage in ("default", *STAGES):  # every stage: the driver's time limit differs even without overrides
        own = (e.stages.get(stage) or {}) if stage != "default" else {}
        res = cfg.resources(stage) if own else e.default

        def key(name: str, own=own, stage=stage) -> str:  # the key that set the merged value
            return f"executor.stages.{stage}.{name}" if name in own else f"executor.default.{name}"

        _validate_resources(res, key, own, e.signal_delay_s, stage, fail, positive)


def _validate_resources(res: StageResources, key, own: dict, signal_delay_s: int, stage: str, fail, positive) -> None:
    if not math.isfinite(res.mem_gb):  # a stage override given as text ("nan") becomes a float only here
        fail(key("mem_gb"), f"must be a finite number, got {res.mem_gb}")
    for name in ("cpus_per_task", "nodes", "tasks_per_node", "array_parallelism", "mem_gb", "shards_per_task"):
        positive(key(name), getattr(res, name))
    if res.gpus_per_node < 0:
        fail(key("gpus_per_node"), f"must be >= 0, got {res.gpus_per_node}")
    if res.mem_gb * 1024 < 1:
        fail(key("mem_gb"), f"must be at least 1 MiB (1/1024), got {res.mem_gb}: sbatch --mem=0 means a whole node")
    if not 0 < res.time_min <= MAX_TIME_MIN:
        fail(key("time_min"), f"must be in (0, {MAX_TIME_MIN}] minutes (365 days), got {res.time_min}")
    limit = min(res.time_min, DRIVER_TIME_CAP_MIN) if stage == "driver" else res.time_min
    if signal_delay_s >= limit * 60:
        fail("executor.signal_delay_s", f"{signal_delay_s} s must be shorter than the time limit of "
             f"{'every stage' if stage == 'default' else 'stage ' + stage} ({limit} min = {limit * 60} s, "
             f"{key('time_min')}): tasks get USR2 that long before the limit to checkpoint")
    for name in ("partition", "account", "qos"):
        value = getattr(res, name)
        if value and not _SLURM_NAME.fullmatch(value):
            fail(key(name), f"reaches sbatch: letters, digits and '_', '.', '-', ',' only, got {value!r}")
    if res.constraint and not _SLURM_CONSTRAINT.fullmatch(res.constraint):
        fail(key("constraint"), f"reaches sbatch: features (letters, digits, '_.:,-') and Slurm's operators "
             f"'&|[]*()!' only, no whitespace, quotes or shell characters; got {res.constraint!r}")
    for opt, value in res.additional_parameters.items():
        group = f"executor.stages.{stage}" if opt in (own.get("additional_parameters") or {}) else "executor.default"
        pkey = f"{group}.additional_parameters.{opt}"
        if not _SLURM_OPTION.fullmatch(str(opt)):
            fail(pkey, f"not an sbatch option name (letters, digits, '_', '-'), got {opt!r}")
        owned = _OWNED_OPTIONS.get(str(opt).replace("_", "-"))
        if owned:
            fail(pkey, f"sbatch --{str(opt).replace('_', '-')} is set by silmm ({owned}); set that instead")
        if value is True:  # a flag: #SBATCH --exclusive
            continue
        if isinstance(value, bool) or value is None:
            fail(pkey, f"{value!r} would be written as '--{opt}={value}': give a value, true for a flag, or remove "
                 f"the key")
        if isinstance(value, float) and not math.isfinite(value):
            fail(pkey, f"must be a finite number, got {value}")
        if not isinstance(value, (str, int, float)) or not _SLURM_VALUE.fullmatch(str(value)):
            fail(pkey, f"reaches sbatch: letters, digits and '_.:,@/+=%[]-' only (no whitespace, quotes or shell "
                 f"characters), got {value!r}")


def _validate_feedback_scorer(cfg: SilmmConfig, fail) -> None:
    fb = cfg.feedback
    if fb.method is not FeedbackMethod.scorer:
        if fb.scorer is not None:
            fail("feedback.scorer", f"'{fb.scorer}' would be ignored: it is read only with feedback.method=scorer "
                 f"(the method is {fb.method.value})")
        return
    from silmm.eval.scorers import SCORERS, scorer_class

    if not fb.scorer:
        fail("feedback.scorer", f"is required with feedback.method=scorer; known: {', '.join(sorted(SCORERS))}")
    if fb.scorer not in SCORERS:
        fail("feedback.scorer", f"unknown scorer '{fb.scorer}'; known: {', '.join(sorted(SCORERS))}")
    only = scorer_class(fb.scorer).benchmarks
    source = getattr(cfg.prompts.source, "value", cfg.prompts.source)
    if only is not None and source not in only:
        fail("feedback.scorer", f"scorer '{fb.scorer}' only scores {', '.join(only)} prompts, and prompts.source "
             f"is '{source}'")


def _validate_eval(cfg: SilmmConfig, fail, positive, check_paths: bool) -> None:
    """`eval.*`: known benchmark and scorer names, a path where the benchmark reads files, sizes > 0; so a
    bad benchmark setting stops `silmm run` / `silmm eval` before anything is submitted."""
    ev = cfg.eval
    positive("eval.prompts_per_shard", ev.prompts_per_shard)
    positive("eval.batch_size", ev.batch_size)
    if not ev.benchmarks:
        return
    from silmm.eval.benchmarks import BENCHMARKS, get_benchmark
    from silmm.eval.records import BenchmarkError
    from silmm.eval.scorers import SCORERS, scorer_class

    for name, b in ev.benchmarks.items():
        key = f"eval.benchmarks.{name}"
        if name not in BENCHMARKS:
            fail(key, f"unknown benchmark '{name}'; known: {', '.join(sorted(BENCHMARKS))}")
        if b.scorer not in SCORERS:
            fail(f"{key}.scorer", f"unknown scorer '{b.scorer}'; known: {', '.join(sorted(SCORERS))}")
        only = scorer_class(b.scorer).benchmarks
        if only is not None and name not in only:
            fail(f"{key}.scorer", f"scorer '{b.scorer}' only scores {', '.join(only)}, not '{name}'")
        for sub in ("images_per_prompt", "max_prompts"):
            if getattr(b, sub) is not None:
                positive(f"{key}.{sub}", getattr(b, sub))
        needs = getattr(scorer_class(b.scorer), "required_checkpoints", None)
        for role, path in (needs(cfg, name) if needs else {}).items():
            ckpt = f"eval.experts.{role}"
            if not path:
                fail(ckpt, f"is required: scorer '{b.scorer}' judges {name} with it (a local checkpoint directory)")
            if check_paths and not (Path(path) / "config.json").is_file():
                fail(ckpt, f"{path}: no checkpoint there (no config.json)")
        bench = get_benchmark(name)
        if getattr(bench, "needs_path", True):
            if not b.path:
                fail(f"{key}.path", f"is required: a local copy of the {bench.display} files (never downloaded "
                     "at run time; see the README's benchmark section)")
            if check_paths and not Path(b.path).exists():
                fail(f"{key}.path", f"{b.path} does not exist")
        if hasattr(bench, "configure"):
            try:
                bench.configure(cfg)
            except BenchmarkError as exc:
                fail(key, str(exc))


# ----------------------------------------------------------------------------- serialising, hashing
def to_yaml(cfg: SilmmConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def to_container(cfg: SilmmConfig) -> dict[str, Any]:
    return OmegaConf.to_container(OmegaConf.structured(cfg), enum_to_str=True)


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


def is_mutable_key(key: str) -> bool:
    return any(key == m or key.startswith(m + ".") for m in MUTABLE_PREFIXES)


def result_keys(cfg: SilmmConfig) -> dict[str, Any]:
    """The flattened keys that can change what a run computes."""
    return {k: v for k, v in flatten(to_container(cfg)).items()
            if not is_mutable_key(k) and not (k in HASH_DEFAULTS and v == HASH_DEFAULTS[k])}


def config_hash(cfg: SilmmConfig) -> str:
    """sha256 (first 16 hex digits) of the result-affecting keys: recorded in every shard."""
    canonical = json.dumps(result_keys(cfg), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def differing_keys(a: SilmmConfig, b: SilmmConfig) -> dict[str, tuple[Any, Any]]:
    fa, fb = flatten(to_container(a)), flatten(to_container(b))
    return {k: (fa.get(k), fb.get(k)) for k in sorted(set(fa) | set(fb)) if fa.get(k) != fb.get(k)}

"""The loss math of SILMM: the DPO family for discrete LMMs, KC-DPO for continuous ones, and SFT baselines.

Variants, each as its paper defines it (``h`` below; ``eps`` = ``train.label_smoothing``, the assumed
probability that a preference label is flipped):

* ``dpo_loss``   DPO (Rafailov et al. 2023, "Direct Preference Optimization"; SILMM Eq. 2):
  ``-log sigmoid(beta h)``. TRL: ``loss_type="sigmoid"``, ``label_smoothing=0``.
* ``cdpo_loss``  conservative DPO (Mitchell 2023, "A note on DPO with noisy preferences & relationship to
  IPO"): the DPO loss against the smoothed target ``1 - eps``. TRL: ``"sigmoid"`` with ``label_smoothing``.
* ``rdpo_loss``  robust DPO (Chowdhury et al. 2024, "Provably Robust DPO: Aligning Language Models with
  Noisy Feedback"): an unbiased estimate of the clean DPO loss under flips. TRL: ``loss_type="robust"``.
* ``ipo_loss``   IPO (Azar et al. 2023, "A General Theoretical Paradigm to Understand Learning from Human
  Preferences"): ``(h - 1/(2 beta))^2``. TRL: ``loss_type="ipo"``.
* ``kcdpo_loss`` Kernel-based Continuous DPO (SILMM Eq. 6), for continuous feature outputs.
* ``sft_discrete_loss`` / ``sft_continuous_loss``: the SFT baselines on the chosen samples.

Every function is pure torch, batched over the leading dimension B and differentiable. Each returns an
output object holding the per-example ``losses`` [B] (``.loss`` is their mean) and detached per-example
statistics. ``.metric_tensors()`` gives the TRL-named batch means as detached 0-dim tensors on the inputs'
device (no host synchronisation, so a trainer can accumulate them per micro-batch); ``.metrics()`` is the
same as Python floats.

Notation: ``pi_c, pi_r`` are the policy's log-probabilities of the chosen / rejected samples, ``ref_c,
ref_r`` the reference model's; ``h = (pi_c - ref_c) - (pi_r - ref_r)`` is the log-ratio difference.
For continuous LMMs ``H`` is the policy's deterministic feature matrix [L, D] for the prompt, ``H_r`` the
reference's, ``H_w`` / ``H_l`` the chosen / rejected sampled features, and ``k`` a kernel distance.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from silmm.config import KernelAggregation, KernelDistance

__all__ = [
    "DPOOutput", "KCDPOOutput", "SFTOutput", "dpo_loss", "cdpo_loss", "rdpo_loss", "ipo_loss",
    "kernel_distance", "kcdpo_loss", "sft_discrete_loss", "sft_continuous_loss",
]

METRIC_DTYPE = torch.float64
"""dtype of ``metric_tensors()``: means of float64 inputs are not rounded, and a trainer summing them over
many micro-batches adds no float32 error. Scalars, so the cost is nil."""


def _mean(x: torch.Tensor) -> torch.Tensor:
    """Detached batch mean as a 0-dim METRIC_DTYPE tensor on x's device; no .item(), so no host sync."""
    return x.detach().to(METRIC_DTYPE).mean()


def _to_floats(tensors: dict[str, torch.Tensor]) -> dict[str, float]:
    return {name: float(value) for name, value in tensors.items()}


def _reward_metrics(chosen: torch.Tensor, rejected: torch.Tensor) -> dict[str, torch.Tensor]:
    return {
        "rewards/chosen": _mean(chosen),
        "rewards/rejected": _mean(rejected),
        "rewards/margins": _mean(chosen - rejected),
        # strict: at the start of training policy == reference and the accuracy is 0, as in TRL
        "rewards/accuracies": _mean(chosen > rejected),
    }


@dataclass
class DPOOutput:
    """Per-example DPO-family / IPO results; rewards are the implicit rewards ``beta * log(pi / pi_ref)``."""

    losses: torch.Tensor  # [B], differentiable
    chosen_rewards: torch.Tensor  # [B], detached: beta * (pi_c - ref_c)
    rejected_rewards: torch.Tensor  # [B], detached: beta * (pi_r - ref_r)
    policy_chosen_logps: torch.Tensor  # [B], detached
    policy_rejected_logps: torch.Tensor  # [B], detached

    @property
    def loss(self) -> torch.Tensor:
        return self.losses.mean()

    def metric_tensors(self) -> dict[str, torch.Tensor]:
        """Batch means, named as TRL's DPOTrainer logs them: detached 0-dim float64 tensors."""
        return {
            **_reward_metrics(self.chosen_rewards, self.rejected_rewards),
            "logps/chosen": _mean(self.policy_chosen_logps),
            "logps/rejected": _mean(self.policy_rejected_logps),
        }

    def metrics(self) -> dict[str, float]:
        """``metric_tensors()`` as floats (synchronises with the device)."""
        return _to_floats(self.metric_tensors())


@dataclass
class KCDPOOutput:
    """Per-example KC-DPO results; the four kernel distances are kept for logging."""

    losses: torch.Tensor  # [B], differentiable
    chosen_rewards: torch.Tensor  # [B], detached: gamma * (k(H_r, H_w) - k(H, H_w))
    rejected_rewards: torch.Tensor  # [B], detached: gamma * (k(H_r, H_l) - k(H, H_l))
    policy_chosen_distance: torch.Tensor  # [B], detached: k(H, H_w)
    ref_chosen_distance: torch.Tensor  # k(H_r, H_w)
    policy_rejected_distance: torch.Tensor  # k(H, H_l)
    ref_rejected_distance: torch.Tensor  # k(H_r, H_l)
    pair_distance: torch.Tensor  # [B], detached: k(H_w, H_l), what gamma must scale up to matter

    @property
    def loss(self) -> torch.Tensor:
        return self.losses.mean()

    def metric_tensors(self) -> dict[str, torch.Tensor]:
        """Batch means (rewards/* as for DPO, distance/*): detached 0-dim float64 tensors."""
        return {
            **_reward_metrics(self.chosen_rewards, self.rejected_rewards),
            "distance/policy_chosen": _mean(self.policy_chosen_distance),
            "distance/ref_chosen": _mean(self.ref_chosen_distance),
            "distance/policy_rejected": _mean(self.policy_rejected_distance),
            "distance/ref_rejected": _mean(self.ref_rejected_distance),
            "distance/chosen_rejected": _mean(self.pair_distance),
        }

    def metrics(self) -> dict[str, float]:
        """``metric_tensors()`` as floats (synchronises with the device)."""
        return _to_floats(self.metric_tensors())


@dataclass
class SFTOutput:
    """Per-example SFT losses on the chosen samples, with the statistic they were computed from."""

    losses: torch.Tensor  # [B], differentiable
    stats: dict[str, torch.Tensor]  # metric name -> detached [B] tensor

    @property
    def loss(self) -> torch.Tensor:
        return self.losses.mean()

    def metric_tensors(self) -> dict[str, torch.Tensor]:
        """Batch means of ``stats``: detached 0-dim float64 tensors."""
        return {name: _mean(value) for name, value in self.stats.items()}

    def metrics(self) -> dict[str, float]:
        """``metric_tensors()`` as floats (synchronises with the device)."""
        return _to_floats(self.metric_tensors())


# -------------------------------------------------------------------------------------------- DPO
def _check_same_shape(**tensors: torch.Tensor) -> None:
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    if len(set(shapes.values())) != 1:
        raise ValueError(f"inputs must have the same shape, got {shapes}")


def _check_positive(name: str, value: float) -> None:
    # `not value > 0` also rejects nan; inf would turn inf * 0 into nan
    if not (value > 0 and math.isfinite(value)):
        raise ValueError(f"{name} must be a finite number > 0, got {value}")


def _check_label_smoothing(label_smoothing: float, variant: str) -> None:
    # eps = 0 is plain DPO (use dpo_loss); eps = 0.5 makes the labels pure noise (rDPO divides by 1 - 2 eps)
    if not 0.0 < label_smoothing < 0.5:
        raise ValueError(f"{variant} needs label_smoothing (the label-flip rate) in (0, 0.5), "
                         f"got {label_smoothing}")


def _log_ratios(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(pi_c - ref_c, pi_r - ref_r); h is their difference."""
    _check_same_shape(policy_chosen_logps=policy_chosen_logps, policy_rejected_logps=policy_rejected_logps,
                      ref_chosen_logps=ref_chosen_logps, ref_rejected_logps=ref_rejected_logps)
    chosen = policy_chosen_logps - ref_chosen_logps
    rejected = policy_rejected_logps - ref_rejected_logps
    return chosen, rejected


def _dpo_output(
    losses: torch.Tensor,
    beta: float,
    chosen: torch.Tensor,
    rejected: torch.Tensor,
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
) -> DPOOutput:
    return DPOOutput(losses, beta * chosen.detach(), beta * rejected.detach(),
                     policy_chosen_logps.detach(), policy_rejected_logps.detach())


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float,
) -> DPOOutput:
    """DPO (Rafailov et al. 2023; SILMM Eq. 2), per example:

        h = (pi_c - ref_c) - (pi_r - ref_r)
        L = -log sigmoid(beta * h)

    All inputs are [B] sequence log-probabilities (summed over the image tokens, as SILMM's trainer
    passes them).
    """
    _check_positive("beta", beta)
    chosen, rejected = _log_ratios(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    # logsigmoid, never log(sigmoid): stays finite (and linear) for |beta h| in the thousands
    losses = -F.logsigmoid(beta * (chosen - rejected))
    return _dpo_output(losses, beta, chosen, rejected, policy_chosen_logps, policy_rejected_logps)


def cdpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float,
    label_smoothing: float,
) -> DPOOutput:
    """Conservative DPO (Mitchell 2023): DPO's binary cross-entropy against the soft target 1 - eps.

        L = -(1 - eps) * log sigmoid(beta * h) - eps * log sigmoid(-beta * h)

    ``eps = label_smoothing`` in (0, 0.5) is the assumed label-flip rate. The loss is minimised at the
    finite margin beta * h = log((1 - eps) / eps): past it the gradient pushes the margin back, so the
    implicit reward gap stays bounded (TRL's ``loss_type="sigmoid"`` with ``label_smoothing``).
    """
    _check_positive("beta", beta)
    _check_label_smoothing(label_smoothing, "cdpo_loss")
    chosen, rejected = _log_ratios(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    logits = beta * (chosen - rejected)
    eps = label_smoothing
    losses = -(1.0 - eps) * F.logsigmoid(logits) - eps * F.logsigmoid(-logits)
    return _dpo_output(losses, beta, chosen, rejected, policy_chosen_logps, policy_rejected_logps)


def rdpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float,
    label_smoothing: float,
) -> DPOOutput:
    """Robust DPO (Chowdhury et al. 2024, "Provably Robust DPO"), per example:

        L(h) = [ -(1 - eps) * log sigmoid(beta * h) + eps * log sigmoid(-beta * h) ] / (1 - 2 * eps)

    With each label flipped independently with probability ``eps = label_smoothing`` in (0, 0.5), it is
    an unbiased estimate of the clean DPO loss: (1 - eps) L(h) + eps L(-h) = -log sigmoid(beta * h)
    exactly (TRL's ``loss_type="robust"``). Unlike cDPO it is not bounded below: its slope in beta*h
    lies between -(1 - eps) / (1 - 2 eps) and -eps / (1 - 2 eps), never 0, so per-example losses are
    negative for large enough margins.
    """
    _check_positive("beta", beta)
    _check_label_smoothing(label_smoothing, "rdpo_loss")
    chosen, rejected = _log_ratios(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    logits = beta * (chosen - rejected)
    eps = label_smoothing
    losses = (-(1.0 - eps) * F.logsigmoid(logits) + eps * F.logsigmoid(-logits)) / (1.0 - 2.0 * eps)
    return _dpo_output(losses, beta, chosen, rejected, policy_chosen_logps, policy_rejected_logps)


def ipo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float,
) -> DPOOutput:
    """IPO (Azar et al. 2023, "A General Theoretical Paradigm to Understand Learning from Human Preferences").

        h = (pi_c - ref_c) - (pi_r - ref_r)
        L = (h - 1 / (2 * beta))**2

    Here ``beta`` is the IPO regularisation tau. The target margin 1/(2 beta) is on whatever scale the
    log-probabilities are given: the IPO paper and TRL average them over tokens. Normalisation is the
    caller's: SILMM's trainer applies ``train.ipo_normalization`` (mean | sum over the image tokens)
    before calling.
    """
    _check_positive("beta", beta)
    chosen, rejected = _log_ratios(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    losses = (chosen - rejected - 1.0 / (2.0 * beta)) ** 2
    return _dpo_output(losses, beta, chosen, rejected, policy_chosen_logps, policy_rejected_logps)


# --------------------------------------------------------------------------------------- kernels
_COSINE_EPS = 1e-12


def _work_dtype(t: torch.Tensor) -> torch.dtype:
    # distances are sums over L*D terms whose differences KC-DPO takes: half precision loses it all
    return t.dtype if t.dtype in (torch.float32, torch.float64) else torch.float32


def _aggregate(h: torch.Tensor, aggregation: KernelAggregation) -> torch.Tensor:
    """[B, L, D] -> [B, N]: flatten (N = L*D), or mean / max over the sequence (N = D)."""
    if aggregation is KernelAggregation.none:
        return h.flatten(1)
    if aggregation is KernelAggregation.avgpool:
        return h.mean(dim=1)
    return h.amax(dim=1)


def _unit(v: torch.Tensor) -> torch.Tensor:
    """v / ||v|| along the last dim; v must be pre-scaled to max |v_i| <= 1 (a zero vector stays zero)."""
    # clamp inside the sqrt: sqrt'(0) is infinite, so clamping outside would give nan gradients at 0
    return v / v.pow(2).sum(dim=-1, keepdim=True).clamp_min(_COSINE_EPS**2).sqrt()


def _max_abs_scaled(a: torch.Tensor) -> torch.Tensor:
    """a / max|a| per example. Cosine distance is invariant to a positive scale, and so are the
    poolings, so this is exact in value and (with the scale detached) in gradient; it keeps sums and
    sums of squares from overflowing or underflowing at any finite magnitude."""
    scale = a.detach().abs().amax(dim=(1, 2), keepdim=True)
    # zero stays zero (scale 1); the floor keeps 1/scale finite for subnormal inputs
    scale = torch.where(scale > 0, scale.clamp_min(torch.finfo(a.dtype).tiny), torch.ones_like(scale))
    return a / scale


def kernel_distance(
    a: torch.Tensor,
    b: torch.Tensor,
    aggregation: KernelAggregation | str = KernelAggregation.avgpool,
    distance: KernelDistance | str = KernelDistance.cosine,
) -> torch.Tensor:
    """The KC-DPO kernel k(a, b) for feature matrices a, b of shape [B, L, D]; returns [B].

    Aggregation along the sequence (SILMM Table 3): ``none`` keeps all L x D entries (flattened),
    ``avgpool`` gives (1/L) sum_i h_i, ``maxpool`` gives max_i h_i (per dimension). Distance on the
    resulting vectors u = agg(a), v = agg(b):

        euclidean:  k = ||u - v||_2^2                 (squared; the squared Frobenius norm for ``none``)
        cosine:     k = 1 - <u, v> / (||u|| ||v||)    (in [0, 2]; a zero vector counts as orthogonal)
    """
    aggregation, distance = KernelAggregation(aggregation), KernelDistance(distance)
    if a.shape != b.shape or a.dim() != 3:
        raise ValueError(f"kernel_distance needs two [B, L, D] tensors of one shape, got {tuple(a.shape)} "
                         f"and {tuple(b.shape)}")
    dtype = _work_dtype(a)
    a, b = a.to(dtype), b.to(dtype)
    if distance is KernelDistance.euclidean:
        return (_aggregate(a, aggregation) - _aggregate(b, aggregation)).pow(2).sum(dim=-1)
    u = _aggregate(_max_abs_scaled(a), aggregation)
    v = _aggregate(_max_abs_scaled(b), aggregation)
    cos = (_unit(u) * _unit(v)).sum(dim=-1)
    # rounding can push |cos| a hair past 1; the distance must stay in [0, 2]
    return 1.0 - cos.clamp(-1.0, 1.0)


def kcdpo_loss(
    policy_H: torch.Tensor,
    ref_H: torch.Tensor,
    chosen_H: torch.Tensor,
    rejected_H: torch.Tensor,
    gamma: float,
    aggregation: KernelAggregation | str = KernelAggregation.avgpool,
    distance: KernelDistance | str = KernelDistance.cosine,
) -> KCDPOOutput:
    """Kernel-based Continuous DPO (SILMM Eq. 6 / App. Eq. 14), per example:

        L = -log sigmoid( gamma * ( -k(H, H_w) + k(H_r, H_w) + k(H, H_l) - k(H_r, H_l) ) )

    With ``aggregation=none, distance=euclidean`` (k = ||.||_F^2) this is exactly DPO with the isotropic
    Gaussian likelihood log pi(H_s | x) = -||H_s - H||_F^2 / (2 sigma^2) + const (mean = the model's
    deterministic output) and gamma = beta / (2 sigma^2) (SILMM Eq. 5). The argument then reduces to
    2 * gamma * <H - H_r, H_w - H_l>_F, linear in H. Implicit rewards, by analogy with DPO:

        chosen = gamma * (k(H_r, H_w) - k(H, H_w)),   rejected = gamma * (k(H_r, H_l) - k(H, H_l))

    All inputs are [B, L, D]; normally only ``policy_H`` carries gradients.
    """
    _check_positive("gamma", gamma)
    _check_same_shape(policy_H=policy_H, ref_H=ref_H, chosen_H=chosen_H, rejected_H=rejected_H)
    k_pw = kernel_distance(policy_H, chosen_H, aggregation, distance)
    k_rw = kernel_distance(ref_H, chosen_H, aggregation, distance)
    k_pl = kernel_distance(policy_H, rejected_H, aggregation, distance)
    k_rl = kernel_distance(ref_H, rejected_H, aggregation, distance)
    chosen = k_rw - k_pw  # > 0 when the policy moved towards H_w relative to the reference
    rejected = k_rl - k_pl
    losses = -F.logsigmoid(gamma * (chosen - rejected))
    with torch.no_grad():
        k_wl = kernel_distance(chosen_H, rejected_H, aggregation, distance)
    return KCDPOOutput(losses, gamma * chosen.detach(), gamma * rejected.detach(),
                       k_pw.detach(), k_rw.detach(), k_pl.detach(), k_rl.detach(), k_wl)


# -------------------------------------------------------------------------------------------- SFT
def sft_discrete_loss(policy_chosen_logps: torch.Tensor, num_tokens: torch.Tensor | int) -> SFTOutput:
    """SFT on the chosen visual-token sequences: mean NLL per token, per example.

        L = -log pi(z_w | x) / |z_w|

    ``policy_chosen_logps`` [B] are summed sequence log-probabilities; ``num_tokens`` is |z_w| (an int,
    or [B] when lengths differ). An int is checked on the host; checking a [B] tensor on an accelerator
    waits for the device.
    """
    if isinstance(num_tokens, torch.Tensor):
        n = num_tokens.to(dtype=policy_chosen_logps.dtype, device=policy_chosen_logps.device)
        if (n <= 0).any():
            raise ValueError("num_tokens must be > 0")
    else:
        if num_tokens <= 0:
            raise ValueError(f"num_tokens must be > 0, got {num_tokens}")
        n = num_tokens  # a Python scalar: no device tensor, no transfer, no sync
    losses = -policy_chosen_logps / n
    return SFTOutput(losses, {"logps/chosen": policy_chosen_logps.detach(),
                              "nll/per_token": losses.detach()})


def sft_continuous_loss(
    policy_H: torch.Tensor,
    chosen_H: torch.Tensor,
    aggregation: KernelAggregation | str = KernelAggregation.avgpool,
    distance: KernelDistance | str = KernelDistance.cosine,
) -> SFTOutput:
    """SFT on the chosen features (SILMM Table 3's baseline): regress the output onto them with the kernel.

        L = k(H, H_w)
    """
    losses = kernel_distance(policy_H, chosen_H, aggregation, distance)
    return SFTOutput(losses, {"distance/policy_chosen": losses.detach()})

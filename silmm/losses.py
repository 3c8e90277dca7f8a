"""The loss math of SILMM: DPO / IPO for discrete LMMs, KC-DPO for continuous ones, and SFT baselines.

Every function is pure torch, batched over the leading dimension B and differentiable. Each returns an
output object holding the per-example ``losses`` [B] (``.loss`` is their mean) and detached per-example
statistics, with ``.metrics()`` giving TRL-style float metrics for logging.

Notation: ``pi_c, pi_r`` are the policy's log-probabilities of the chosen / rejected samples, ``ref_c,
ref_r`` the reference model's; ``h = (pi_c - ref_c) - (pi_r - ref_r)`` is the log-ratio difference.
For continuous LMMs ``H`` is the policy's deterministic feature matrix [L, D] for the prompt, ``H_r`` the
reference's, ``H_w`` / ``H_l`` the chosen / rejected sampled features, and ``k`` a kernel distance.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from silmm.config import KernelAggregation, KernelDistance

__all__ = [
    "DPOOutput", "KCDPOOutput", "SFTOutput", "dpo_loss", "ipo_loss", "kernel_distance", "kcdpo_loss",
    "sft_discrete_loss", "sft_continuous_loss",
]


def _mean(x: torch.Tensor) -> float:
    return x.detach().to(torch.float64).mean().item()  # float64: no rounding of float64 inputs


def _reward_metrics(chosen: torch.Tensor, rejected: torch.Tensor) -> dict[str, float]:
    return {
        "rewards/chosen": _mean(chosen),
        "rewards/rejected": _mean(rejected),
        "rewards/margins": _mean(chosen - rejected),
        # strict: at the start of training policy == reference and the accuracy is 0, as in TRL
        "rewards/accuracies": _mean((chosen > rejected).float()),
    }


@dataclass
class DPOOutput:
    """Per-example DPO / IPO results; rewards are the implicit rewards ``beta * log(pi / pi_ref)``."""

    losses: torch.Tensor  # [B], differentiable
    chosen_rewards: torch.Tensor  # [B], detached: beta * (pi_c - ref_c)
    rejected_rewards: torch.Tensor  # [B], detached: beta * (pi_r - ref_r)
    policy_chosen_logps: torch.Tensor  # [B], detached
    policy_rejected_logps: torch.Tensor  # [B], detached

    @property
    def loss(self) -> torch.Tensor:
        return self.losses.mean()

    def metrics(self) -> dict[str, float]:
        """Batch means, named as TRL's DPOTrainer logs them."""
        return {
            **_reward_metrics(self.chosen_rewards, self.rejected_rewards),
            "logps/chosen": _mean(self.policy_chosen_logps),
            "logps/rejected": _mean(self.policy_rejected_logps),
        }


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

    @property
    def loss(self) -> torch.Tensor:
        return self.losses.mean()

    def metrics(self) -> dict[str, float]:
        return {
            **_reward_metrics(self.chosen_rewards, self.rejected_rewards),
            "distance/policy_chosen": _mean(self.policy_chosen_distance),
            "distance/ref_chosen": _mean(self.ref_chosen_distance),
            "distance/policy_rejected": _mean(self.policy_rejected_distance),
            "distance/ref_rejected": _mean(self.ref_rejected_distance),
        }


@dataclass
class SFTOutput:
    """Per-example SFT losses on the chosen samples, with the statistic they were computed from."""

    losses: torch.Tensor  # [B], differentiable
    stats: dict[str, torch.Tensor]  # metric name -> detached [B] tensor

    @property
    def loss(self) -> torch.Tensor:
        return self.losses.mean()

    def metrics(self) -> dict[str, float]:
        return {name: _mean(value) for name, value in self.stats.items()}


# -------------------------------------------------------------------------------------------- DPO
def _check_same_shape(**tensors: torch.Tensor) -> None:
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    if len(set(shapes.values())) != 1:
        raise ValueError(f"inputs must have the same shape, got {shapes}")


def _log_ratios(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps):
    _check_same_shape(policy_chosen_logps=policy_chosen_logps, policy_rejected_logps=policy_rejected_logps,
                      ref_chosen_logps=ref_chosen_logps, ref_rejected_logps=ref_rejected_logps)
    chosen = policy_chosen_logps - ref_chosen_logps
    rejected = policy_rejected_logps - ref_rejected_logps
    return chosen, rejected


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float,
    label_smoothing: float = 0.0,
) -> DPOOutput:
    """Sigmoid DPO (Rafailov et al. 2023; SILMM Eq. 2), with optional conservative label smoothing.

        h = (pi_c - ref_c) - (pi_r - ref_r)
        L = -(1 - eps) * log sigmoid(beta * h) - eps * log sigmoid(-beta * h)

    ``eps = label_smoothing`` is the assumed probability that a preference label is flipped
    (conservative / robust DPO, as TRL's ``label_smoothing``); eps = 0 is plain DPO. All inputs are [B]
    summed sequence log-probabilities.
    """
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    if not 0.0 <= label_smoothing <= 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5], got {label_smoothing}")
    chosen, rejected = _log_ratios(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    logits = beta * (chosen - rejected)
    # logsigmoid, never log(sigmoid): stays finite for |logits| in the thousands
    losses = -F.logsigmoid(logits)
    if label_smoothing > 0:  # skip the extra term when off, so eps = 0 is bit-identical to plain DPO
        losses = (1.0 - label_smoothing) * losses - label_smoothing * F.logsigmoid(-logits)
    return DPOOutput(losses, beta * chosen.detach(), beta * rejected.detach(),
                     policy_chosen_logps.detach(), policy_rejected_logps.detach())


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

    Here ``beta`` is the IPO regularisation tau. The IPO paper (and TRL) use length-averaged
    log-probabilities; that is the caller's choice of what to pass in.
    """
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    chosen, rejected = _log_ratios(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    losses = (chosen - rejected - 1.0 / (2.0 * beta)) ** 2
    return DPOOutput(losses, beta * chosen.detach(), beta * rejected.detach(),
                     policy_chosen_logps.detach(), policy_rejected_logps.detach())


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
    if gamma <= 0:
        raise ValueError(f"gamma must be > 0, got {gamma}")
    _check_same_shape(policy_H=policy_H, ref_H=ref_H, chosen_H=chosen_H, rejected_H=rejected_H)
    k_pw = kernel_distance(policy_H, chosen_H, aggregation, distance)
    k_rw = kernel_distance(ref_H, chosen_H, aggregation, distance)
    k_pl = kernel_distance(policy_H, rejected_H, aggregation, distance)
    k_rl = kernel_distance(ref_H, rejected_H, aggregation, distance)
    chosen = k_rw - k_pw  # > 0 when the policy moved towards H_w relative to the reference
    rejected = k_rl - k_pl
    losses = -F.logsigmoid(gamma * (chosen - rejected))
    return KCDPOOutput(losses, gamma * chosen.detach(), gamma * rejected.detach(),
                       k_pw.detach(), k_rw.detach(), k_pl.detach(), k_rl.detach())


# -------------------------------------------------------------------------------------------- SFT
def sft_discrete_loss(policy_chosen_logps: torch.Tensor, num_tokens: torch.Tensor | int) -> SFTOutput:
    """SFT on the chosen visual-token sequences: mean NLL per token, per example.

        L = -log pi(z_w | x) / |z_w|

    ``policy_chosen_logps`` [B] are summed sequence log-probabilities; ``num_tokens`` is |z_w| (an int,
    or [B] when lengths differ).
    """
    n = torch.as_tensor(num_tokens, dtype=policy_chosen_logps.dtype, device=policy_chosen_logps.device)
    if (n <= 0).any():
        raise ValueError("num_tokens must be > 0")
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

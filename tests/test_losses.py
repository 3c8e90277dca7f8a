"""silmm.losses against independent computations (math / numpy loops), the paper's Gaussian identity,
and property tests. Reference values are never computed with the code under test."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from silmm.config import KernelAggregation, KernelDistance
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

AGGS = ["none", "avgpool", "maxpool"]
DISTS = ["euclidean", "cosine"]
KERNELS = [(a, d) for a in AGGS for d in DISTS]
DPO_KEYS = {"rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
            "logps/chosen", "logps/rejected"}
KCDPO_KEYS = {"rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
              "distance/policy_chosen", "distance/ref_chosen", "distance/policy_rejected",
              "distance/ref_rejected", "distance/chosen_rejected"}


# ------------------------------------------------------------------ independent scalar references
def neg_log_sigmoid(x: float) -> float:
    """-log(1 / (1 + e^-x)) = log(1 + e^-x), written in the overflow-free form."""
    return max(-x, 0.0) + math.log1p(math.exp(-abs(x)))


def np_kernel(a: np.ndarray, b: np.ndarray, agg: str, dist: str) -> float:
    """One example [L, D] -> k(a, b), by explicit loops."""
    L, D = a.shape
    if agg == "none":
        u, v = [a[i, j] for i in range(L) for j in range(D)], [b[i, j] for i in range(L) for j in range(D)]
    elif agg == "avgpool":
        u = [sum(a[i, j] for i in range(L)) / L for j in range(D)]
        v = [sum(b[i, j] for i in range(L)) / L for j in range(D)]
    else:
        u = [max(a[i, j] for i in range(L)) for j in range(D)]
        v = [max(b[i, j] for i in range(L)) for j in range(D)]
    if dist == "euclidean":
        return sum((x - y) ** 2 for x, y in zip(u, v, strict=True))
    dot = sum(x * y for x, y in zip(u, v, strict=True))
    return 1.0 - dot / (math.sqrt(sum(x * x for x in u)) * math.sqrt(sum(y * y for y in v)))


def rand_logps(rng: np.random.Generator, n: int, scale: float = 30.0) -> list[np.ndarray]:
    return [-np.abs(rng.normal(100.0, scale, size=n)) for _ in range(4)]


def t64(x: np.ndarray, grad: bool = False) -> torch.Tensor:
    return torch.tensor(x, dtype=torch.float64, requires_grad=grad)


# ---------------------------------------------------------------------------------------------- DPO
def naive_neg_log_sigmoid(x: float) -> float:
    """-log sigmoid(x) straight from the definition (numpy; fine for the moderate |x| it is used at)."""
    return float(-np.log(1.0 / (1.0 + np.exp(-x))))


def ref_cdpo(beta_h: float, eps: float) -> float:
    return (1 - eps) * neg_log_sigmoid(beta_h) + eps * neg_log_sigmoid(-beta_h)


def ref_rdpo(beta_h: float, eps: float) -> float:
    return ((1 - eps) * neg_log_sigmoid(beta_h) - eps * neg_log_sigmoid(-beta_h)) / (1 - 2 * eps)


def margins(pc, pr, rc, rr) -> list[float]:
    return [float((pc[i] - rc[i]) - (pr[i] - rr[i])) for i in range(len(pc))]


def h_of(args: list[torch.Tensor]) -> torch.Tensor:
    pc, pr, rc, rr = args
    return (pc - rc) - (pr - rr)


def check_rewards(out, pc, pr, rc, rr, beta):
    for i in range(len(pc)):
        assert out.chosen_rewards[i].item() == pytest.approx(beta * (pc[i] - rc[i]), rel=1e-12)
        assert out.rejected_rewards[i].item() == pytest.approx(beta * (pr[i] - rr[i]), rel=1e-12)
        assert out.policy_chosen_logps[i].item() == pc[i] and out.policy_rejected_logps[i].item() == pr[i]


def test_dpo_matches_hand_computation():
    rng = np.random.default_rng(0)
    pc, pr, rc, rr = rand_logps(rng, 16)
    beta = 0.2
    out = dpo_loss(t64(pc), t64(pr), t64(rc), t64(rr), beta=beta)
    for i, h in enumerate(margins(pc, pr, rc, rr)):
        assert out.losses[i].item() == pytest.approx(neg_log_sigmoid(beta * h), rel=1e-12, abs=1e-12)
        assert out.losses[i].item() == pytest.approx(naive_neg_log_sigmoid(beta * h), rel=1e-9, abs=1e-12)
    check_rewards(out, pc, pr, rc, rr, beta)
    assert out.loss.item() == pytest.approx(float(np.mean(out.losses.numpy())), rel=1e-12)


@pytest.mark.parametrize("eps", [0.05, 0.1, 0.3, 0.45])
def test_cdpo_matches_hand_computation(eps):
    rng = np.random.default_rng(10)
    pc, pr, rc, rr = rand_logps(rng, 16, scale=5.0)
    beta = 0.2
    out = cdpo_loss(t64(pc), t64(pr), t64(rc), t64(rr), beta=beta, label_smoothing=eps)
    for i, h in enumerate(margins(pc, pr, rc, rr)):
        assert out.losses[i].item() == pytest.approx(ref_cdpo(beta * h, eps), rel=1e-12, abs=1e-12)
        naive = (1 - eps) * naive_neg_log_sigmoid(beta * h) + eps * naive_neg_log_sigmoid(-beta * h)
        assert out.losses[i].item() == pytest.approx(naive, rel=1e-9)
    check_rewards(out, pc, pr, rc, rr, beta)


@pytest.mark.parametrize("eps", [0.05, 0.1, 0.3, 0.45])
def test_rdpo_matches_hand_computation(eps):
    rng = np.random.default_rng(11)
    pc, pr, rc, rr = rand_logps(rng, 16, scale=5.0)
    beta = 0.2
    out = rdpo_loss(t64(pc), t64(pr), t64(rc), t64(rr), beta=beta, label_smoothing=eps)
    for i, h in enumerate(margins(pc, pr, rc, rr)):
        assert out.losses[i].item() == pytest.approx(ref_rdpo(beta * h, eps), rel=1e-12, abs=1e-12)
        naive = ((1 - eps) * naive_neg_log_sigmoid(beta * h) - eps * naive_neg_log_sigmoid(-beta * h)) / (1 - 2 * eps)
        assert out.losses[i].item() == pytest.approx(naive, rel=1e-9, abs=1e-12)
    check_rewards(out, pc, pr, rc, rr, beta)


@pytest.mark.parametrize("eps", [0.01, 0.1, 0.25, 0.4, 0.49])
def test_rdpo_is_unbiased_under_label_flips(eps):
    """Chowdhury et al. 2024: if each label is flipped with probability eps, the expected rDPO loss is the
    clean DPO loss, (1 - eps) L(h) + eps L(-h) = -log sigmoid(beta h), for every h."""
    rng = np.random.default_rng(12)
    pc, pr, rc, rr = (t64(x) for x in rand_logps(rng, 64, scale=10.0))
    beta = 0.3
    kept = rdpo_loss(pc, pr, rc, rr, beta=beta, label_smoothing=eps).losses
    flipped = rdpo_loss(pr, pc, rr, rc, beta=beta, label_smoothing=eps).losses  # chosen <-> rejected: h -> -h
    expected = (1 - eps) * kept + eps * flipped
    for i, h in enumerate(margins(pc.numpy(), pr.numpy(), rc.numpy(), rr.numpy())):
        assert abs(expected[i].item() - neg_log_sigmoid(beta * h)) <= 1e-12 * max(1.0, abs(beta * h))
    clean = dpo_loss(pc, pr, rc, rr, beta=beta).losses
    assert torch.allclose(expected, clean, rtol=1e-12, atol=1e-12)
    # cDPO is not: its expectation under flips is a different (more smoothed) loss
    c_kept = cdpo_loss(pc, pr, rc, rr, beta=beta, label_smoothing=eps).losses
    c_flipped = cdpo_loss(pr, pc, rr, rc, beta=beta, label_smoothing=eps).losses
    assert not torch.allclose((1 - eps) * c_kept + eps * c_flipped, clean, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("eps", [0.1, 0.3])
def test_rdpo_differs_from_cdpo(eps):
    rng = np.random.default_rng(13)
    args = [t64(x) for x in rand_logps(rng, 8)]
    c = cdpo_loss(*args, beta=0.5, label_smoothing=eps).losses
    r = rdpo_loss(*args, beta=0.5, label_smoothing=eps).losses
    h = (args[0] - args[2]) - (args[1] - args[3])
    assert (h != 0).all() and (c != r).all() and not torch.allclose(c, r, rtol=1e-3)
    # both equal log 2 at h = 0 (policy == reference), where the variants cannot differ
    x = torch.zeros(3, dtype=torch.float64)
    for fn in (cdpo_loss, rdpo_loss):
        assert torch.allclose(fn(x, x, x, x, beta=0.5, label_smoothing=eps).losses,
                              torch.full((3,), math.log(2), dtype=torch.float64))


def test_cdpo_and_rdpo_tend_to_dpo_as_eps_vanishes():
    rng = np.random.default_rng(14)
    args = [t64(x) for x in rand_logps(rng, 8, scale=3.0)]
    plain = dpo_loss(*args, beta=0.5).losses
    for fn in (cdpo_loss, rdpo_loss):
        assert torch.allclose(fn(*args, beta=0.5, label_smoothing=1e-9).losses, plain, rtol=1e-6, atol=1e-6)
    # cDPO costs more than DPO wherever the pair is already ranked right (it hedges against a flip)
    smoothed = cdpo_loss(*args, beta=0.5, label_smoothing=0.2).losses
    right = h_of(args) > 0
    assert right.any() and (smoothed[right] > plain[right]).all()


def test_dpo_metrics_by_hand():
    pc, pr = np.array([-10.0, -20.0, -5.0]), np.array([-12.0, -15.0, -5.0])
    rc, rr = np.array([-11.0, -19.0, -6.0]), np.array([-11.0, -16.0, -4.0])
    beta = 0.5
    for out in (dpo_loss(t64(pc), t64(pr), t64(rc), t64(rr), beta=beta),
                cdpo_loss(t64(pc), t64(pr), t64(rc), t64(rr), beta=beta, label_smoothing=0.1),
                rdpo_loss(t64(pc), t64(pr), t64(rc), t64(rr), beta=beta, label_smoothing=0.1)):
        m = out.metrics()
        assert set(m) == DPO_KEYS and all(isinstance(v, float) for v in m.values())
        cr = [beta * (a - b) for a, b in zip(pc, rc, strict=True)]  # 0.5, -0.5, 0.5
        rj = [beta * (a - b) for a, b in zip(pr, rr, strict=True)]  # -0.5, 0.5, -0.5
        assert m["rewards/chosen"] == pytest.approx(sum(cr) / 3)
        assert m["rewards/rejected"] == pytest.approx(sum(rj) / 3)
        assert m["rewards/margins"] == pytest.approx((sum(cr) - sum(rj)) / 3)
        assert m["rewards/accuracies"] == pytest.approx(2 / 3)
        assert m["logps/chosen"] == pytest.approx(-35 / 3)
        assert m["logps/rejected"] == pytest.approx(-32 / 3)


def test_dpo_gradient_signs():
    rng = np.random.default_rng(2)
    pc, pr, rc, rr = (t64(x, grad=True) for x in rand_logps(rng, 6, scale=1.0))
    dpo_loss(pc, pr, rc, rr, beta=0.2).loss.backward()
    # raising the chosen log-prob (or lowering the rejected one) always lowers DPO's loss
    assert (pc.grad < 0).all() and (pr.grad > 0).all()
    assert (rc.grad > 0).all() and (rr.grad < 0).all()
    assert torch.allclose(pc.grad, -pr.grad) and torch.allclose(pc.grad, -rc.grad)


@pytest.mark.parametrize("eps", [0.05, 0.2, 0.45])
def test_rdpo_gradient_always_raises_the_margin(eps):
    """d L / d(beta h) = -[(1 - eps) sigmoid(-beta h) + eps sigmoid(beta h)] / (1 - 2 eps): never 0, even
    far past any margin, so descent raises the chosen margin everywhere."""
    beta = 0.5
    bh = np.array([-40.0, -3.0, -0.1, 0.0, 0.1, 3.0, 40.0])
    pc = t64(bh / beta, grad=True)
    pr, rc, rr = (torch.zeros(len(bh), dtype=torch.float64, requires_grad=True) for _ in range(3))
    rdpo_loss(pc, pr, rc, rr, beta=beta, label_smoothing=eps).losses.sum().backward()
    assert (pc.grad < 0).all() and (pr.grad > 0).all() and (rc.grad > 0).all() and (rr.grad < 0).all()
    for i, x in enumerate(bh):  # per-example gradient against the hand derivative (times beta)
        sig = 1 / (1 + math.exp(-x))
        want = -beta * ((1 - eps) * (1 - sig) + eps * sig) / (1 - 2 * eps)
        assert pc.grad[i].item() == pytest.approx(want, rel=1e-10)


@pytest.mark.parametrize("eps", [0.05, 0.2, 0.45])
def test_cdpo_gradient_raises_the_margin_up_to_its_optimum(eps):
    """cDPO's d L / d(beta h) = sigmoid(beta h) - (1 - eps): descent raises the margin below the optimum
    beta h* = log((1 - eps) / eps) and lowers it above, where it would be overconfident."""
    beta = 0.5
    opt = math.log((1 - eps) / eps)
    bh = np.array([-5.0, 0.0, opt - 0.5, opt + 0.5, opt + 5.0])
    pc = t64(bh / beta, grad=True)
    pr, rc, rr = (torch.zeros(len(bh), dtype=torch.float64) for _ in range(3))
    cdpo_loss(pc, pr, rc, rr, beta=beta, label_smoothing=eps).losses.sum().backward()
    below = torch.from_numpy(bh < opt)
    assert (pc.grad[below] < 0).all() and (pc.grad[~below] > 0).all()
    for i, x in enumerate(bh):
        assert pc.grad[i].item() == pytest.approx(beta * (1 / (1 + math.exp(-x)) - (1 - eps)), rel=1e-10)
    at_opt = t64(np.array([opt / beta]), grad=True)
    z = torch.zeros(1, dtype=torch.float64)
    cdpo_loss(at_opt, z, z, z, beta=beta, label_smoothing=eps).loss.backward()
    assert at_opt.grad.item() == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("variant", ["dpo", "cdpo", "rdpo", "ipo"])
def test_descent_step_raises_the_chosen_margin(variant):
    """From policy == reference, one gradient step on the policy log-probs raises h and lowers the loss."""
    fn = {"dpo": dpo_loss, "ipo": ipo_loss,
          "cdpo": lambda *a, **k: cdpo_loss(*a, **k, label_smoothing=0.2),
          "rdpo": lambda *a, **k: rdpo_loss(*a, **k, label_smoothing=0.2)}[variant]
    rc, rr = torch.tensor([-50.0, -20.0], dtype=torch.float64), torch.tensor([-48.0, -25.0], dtype=torch.float64)
    pc, pr = rc.clone().requires_grad_(True), rr.clone().requires_grad_(True)
    out = fn(pc, pr, rc, rr, beta=0.2)
    out.loss.backward()
    pc2, pr2 = (pc - 0.1 * pc.grad).detach(), (pr - 0.1 * pr.grad).detach()
    out2 = fn(pc2, pr2, rc, rr, beta=0.2)
    assert out2.loss.item() < out.loss.item()
    assert ((pc2 - rc) - (pr2 - rr) > 0).all() and out2.metrics()["rewards/accuracies"] == 1.0


def test_dpo_chosen_step_decreases_loss():
    pc, pr, rc, rr = (torch.tensor([x], dtype=torch.float64) for x in (-50.0, -48.0, -49.0, -49.0))
    base = dpo_loss(pc, pr, rc, rr, beta=0.2).loss.item()
    assert dpo_loss(pc + 1.0, pr, rc, rr, beta=0.2).loss.item() < base
    assert dpo_loss(pc, pr - 1.0, rc, rr, beta=0.2).loss.item() < base


def test_dpo_at_reference_is_log2():
    x = torch.randn(5, dtype=torch.float64)
    y = torch.randn(5, dtype=torch.float64)
    out = dpo_loss(x, y, x.clone(), y.clone(), beta=0.2)
    assert torch.allclose(out.losses, torch.full((5,), math.log(2), dtype=torch.float64))
    assert out.metrics()["rewards/accuracies"] == 0.0


@pytest.mark.parametrize("beta", [0.0, -0.1, math.nan, math.inf])
def test_dpo_family_rejects_bad_beta(beta):
    x = torch.zeros(3)
    for call in (lambda: dpo_loss(x, x, x, x, beta=beta), lambda: ipo_loss(x, x, x, x, beta=beta),
                 lambda: cdpo_loss(x, x, x, x, beta=beta, label_smoothing=0.1),
                 lambda: rdpo_loss(x, x, x, x, beta=beta, label_smoothing=0.1)):
        with pytest.raises(ValueError, match="beta"):
            call()


@pytest.mark.parametrize("eps", [0.0, 0.5, -0.1, 0.7, 1.0, math.nan])
def test_cdpo_rdpo_reject_bad_label_smoothing(eps):
    x = torch.zeros(3)
    for fn in (cdpo_loss, rdpo_loss):
        with pytest.raises(ValueError, match="label_smoothing"):
            fn(x, x, x, x, beta=0.1, label_smoothing=eps)


def test_dpo_family_rejects_bad_shapes_and_old_api():
    x = torch.zeros(3)
    for call in (lambda: dpo_loss(x, x, x, torch.zeros(4), beta=0.1),
                 lambda: ipo_loss(x, x, torch.zeros(4), x, beta=0.1),
                 lambda: cdpo_loss(x, torch.zeros(4), x, x, beta=0.1, label_smoothing=0.1),
                 lambda: rdpo_loss(torch.zeros(4), x, x, x, beta=0.1, label_smoothing=0.1)):
        with pytest.raises(ValueError, match="same shape"):
            call()
    with pytest.raises(TypeError):  # smoothing is cdpo_loss / rdpo_loss now, never silently plain DPO
        dpo_loss(x, x, x, x, beta=0.1, label_smoothing=0.1)
    with pytest.raises(TypeError):  # and they have no default eps
        cdpo_loss(x, x, x, x, beta=0.1)


# ---------------------------------------------------------------------------------------------- IPO
def test_ipo_formula():
    rng = np.random.default_rng(3)
    pc, pr, rc, rr = rand_logps(rng, 10)
    beta = 0.1
    out = ipo_loss(t64(pc), t64(pr), t64(rc), t64(rr), beta=beta)
    for i in range(10):
        h = (pc[i] - rc[i]) - (pr[i] - rr[i])
        assert out.losses[i].item() == pytest.approx((h - 1 / (2 * beta)) ** 2, rel=1e-12)
    # zero loss exactly at the IPO target margin h = 1/(2 beta)
    z = torch.zeros(1, dtype=torch.float64)
    assert ipo_loss(z + 5.0, z, z, z, beta=beta).losses.item() == pytest.approx(0.0, abs=1e-12)
    assert set(out.metrics()) == DPO_KEYS


# ------------------------------------------------------------------------------------------ kernels
@pytest.mark.parametrize(("agg", "dist"), KERNELS)
def test_kernel_matches_numpy(agg, dist):
    rng = np.random.default_rng(4)
    a, b = rng.normal(size=(5, 4, 3)), rng.normal(size=(5, 4, 3))
    got = kernel_distance(t64(a), t64(b), agg, dist)
    assert got.shape == (5,)
    for i in range(5):
        assert got[i].item() == pytest.approx(np_kernel(a[i], b[i], agg, dist), rel=1e-10, abs=1e-12)


@pytest.mark.parametrize(("agg", "dist"), KERNELS)
def test_kernel_accepts_enums_and_strings(agg, dist):
    a, b = torch.randn(2, 3, 4), torch.randn(2, 3, 4)
    by_enum = kernel_distance(a, b, KernelAggregation(agg), KernelDistance(dist))
    assert torch.equal(by_enum, kernel_distance(a, b, agg, dist))


def test_kernel_rejects_bad_arguments():
    a = torch.randn(2, 3, 4)
    with pytest.raises(ValueError):
        kernel_distance(a, a, "sumpool", "cosine")
    with pytest.raises(ValueError):
        kernel_distance(a, a, "none", "manhattan")
    with pytest.raises(ValueError):
        kernel_distance(a, torch.randn(2, 3, 5))
    with pytest.raises(ValueError):
        kernel_distance(a[0], a[0])  # [L, D] without the batch dimension


@pytest.mark.parametrize("agg", AGGS)
def test_cosine_parallel_zero_and_scale_invariant(agg):
    a = torch.rand(3, 4, 5, dtype=torch.float64) + 0.1  # positive: pooling commutes with positive scaling
    for s in (1.0, 1e-20, 3.7, 1e20):
        assert torch.allclose(kernel_distance(a, s * a, agg, "cosine"), torch.zeros(3, dtype=torch.float64),
                              atol=1e-12)
    b = torch.randn(3, 4, 5, dtype=torch.float64)
    base = kernel_distance(a, b, agg, "cosine")
    for s in (1e-30, 0.01, 250.0, 1e30):
        assert torch.allclose(kernel_distance(s * a, b, agg, "cosine"), base, rtol=1e-10, atol=1e-12)
        assert torch.allclose(kernel_distance(a, s * b, agg, "cosine"), base, rtol=1e-10, atol=1e-12)


def test_cosine_antiparallel_is_two_and_zero_vector_is_safe():
    a = torch.randn(2, 3, 4, dtype=torch.float64)
    assert torch.allclose(kernel_distance(a, -a, "none", "cosine"), torch.full((2,), 2.0, dtype=torch.float64))
    z = torch.zeros(2, 3, 4, requires_grad=True)
    d = kernel_distance(z, torch.randn(2, 3, 4), "avgpool", "cosine")
    assert torch.allclose(d, torch.ones(2))
    d.sum().backward()
    assert torch.isfinite(z.grad).all()


def test_cosine_gradient_matches_numerical():
    a = torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True)
    b = torch.randn(2, 3, 4, dtype=torch.float64)
    for agg in AGGS:
        assert torch.autograd.gradcheck(lambda x, agg=agg: kernel_distance(x, b, agg, "cosine"), (a,))


def test_kernel_half_precision_is_computed_in_float32():
    a, b = torch.randn(2, 8, 16), torch.randn(2, 8, 16)
    got = kernel_distance(a.bfloat16(), b.bfloat16(), "none", "euclidean")
    assert got.dtype == torch.float32
    want = kernel_distance(a.bfloat16().float(), b.bfloat16().float(), "none", "euclidean")
    assert torch.equal(got, want)


# ------------------------------------------------------------------------------------------- KC-DPO
def gaussian_loglik(sample: np.ndarray, mean: np.ndarray, sigma: float) -> float:
    """log N(sample; mean, sigma^2 I) with the normalising constant, entry by entry."""
    total = 0.0
    for x, m in zip(sample.ravel(), mean.ravel(), strict=True):
        total += -0.5 * math.log(2 * math.pi * sigma**2) - (x - m) ** 2 / (2 * sigma**2)
    return total


@pytest.mark.parametrize("sigma", [0.5, 1.0, 2.3])
def test_kcdpo_equals_gaussian_dpo(sigma):
    """SILMM Eq. 5 / App. 8: DPO with isotropic-Gaussian likelihoods centred on the policy / reference
    outputs is KC-DPO with k = ||.||_F^2 (no aggregation) and gamma = beta / (2 sigma^2)."""
    rng = np.random.default_rng(5)
    B, L, D, beta = 6, 4, 3, 0.7
    H, Hr = rng.normal(size=(B, L, D)), rng.normal(size=(B, L, D))
    Hw, Hl = rng.normal(size=(B, L, D)), rng.normal(size=(B, L, D))
    pc = np.array([gaussian_loglik(Hw[i], H[i], sigma) for i in range(B)])
    pr = np.array([gaussian_loglik(Hl[i], H[i], sigma) for i in range(B)])
    rc = np.array([gaussian_loglik(Hw[i], Hr[i], sigma) for i in range(B)])
    rr = np.array([gaussian_loglik(Hl[i], Hr[i], sigma) for i in range(B)])
    gamma = beta / (2 * sigma**2)
    kc = kcdpo_loss(t64(H), t64(Hr), t64(Hw), t64(Hl), gamma=gamma, aggregation="none", distance="euclidean")
    dpo = dpo_loss(t64(pc), t64(pr), t64(rc), t64(rr), beta=beta)
    assert torch.allclose(kc.losses, dpo.losses, rtol=0, atol=1e-6)
    assert torch.allclose(kc.chosen_rewards, dpo.chosen_rewards, rtol=0, atol=1e-6)
    assert torch.allclose(kc.rejected_rewards, dpo.rejected_rewards, rtol=0, atol=1e-6)
    for i in range(B):  # and against the scalar DPO formula, independently of dpo_loss
        h = (pc[i] - rc[i]) - (pr[i] - rr[i])
        assert kc.losses[i].item() == pytest.approx(neg_log_sigmoid(beta * h), abs=1e-6)


@pytest.mark.parametrize(("agg", "dist"), KERNELS)
def test_kcdpo_matches_numpy(agg, dist):
    rng = np.random.default_rng(6)
    H, Hr, Hw, Hl = (rng.normal(size=(4, 3, 5)) for _ in range(4))
    gamma = 3.0
    out = kcdpo_loss(t64(H), t64(Hr), t64(Hw), t64(Hl), gamma, agg, dist)
    assert out.losses.shape == (4,)
    for i in range(4):
        k_pw, k_rw = np_kernel(H[i], Hw[i], agg, dist), np_kernel(Hr[i], Hw[i], agg, dist)
        k_pl, k_rl = np_kernel(H[i], Hl[i], agg, dist), np_kernel(Hr[i], Hl[i], agg, dist)
        want = neg_log_sigmoid(gamma * (-k_pw + k_rw + k_pl - k_rl))
        assert out.losses[i].item() == pytest.approx(want, rel=1e-10, abs=1e-12)
        assert out.chosen_rewards[i].item() == pytest.approx(gamma * (k_rw - k_pw), rel=1e-10, abs=1e-12)
        assert out.rejected_rewards[i].item() == pytest.approx(gamma * (k_rl - k_pl), rel=1e-10, abs=1e-12)
        assert out.policy_chosen_distance[i].item() == pytest.approx(k_pw, rel=1e-10, abs=1e-12)
        assert out.ref_rejected_distance[i].item() == pytest.approx(k_rl, rel=1e-10, abs=1e-12)


def test_kcdpo_euclidean_is_linear_in_policy_output():
    """||.||_F^2 kernel: the bracket collapses to 2 <H - H_r, H_w - H_l>_F (the |H|^2 terms cancel)."""
    rng = np.random.default_rng(7)
    H, Hr, Hw, Hl = (rng.normal(size=(3, 4, 2)) for _ in range(4))
    out = kcdpo_loss(t64(H), t64(Hr), t64(Hw), t64(Hl), 0.25, "none", "euclidean")
    for i in range(3):
        inner = float(np.sum((H[i] - Hr[i]) * (Hw[i] - Hl[i])))
        assert out.losses[i].item() == pytest.approx(neg_log_sigmoid(0.25 * 2 * inner), rel=1e-10)


@pytest.mark.parametrize(("agg", "dist"), KERNELS)
def test_kcdpo_at_reference_is_log2(agg, dist):
    H = torch.randn(5, 3, 4, dtype=torch.float64)
    Hw, Hl = torch.randn(5, 3, 4, dtype=torch.float64), torch.randn(5, 3, 4, dtype=torch.float64)
    out = kcdpo_loss(H, H.clone(), Hw, Hl, gamma=3.0, aggregation=agg, distance=dist)
    assert torch.allclose(out.losses, torch.full((5,), math.log(2), dtype=torch.float64), atol=1e-12)
    m = out.metrics()
    assert set(m) == KCDPO_KEYS
    assert m["rewards/margins"] == pytest.approx(0.0, abs=1e-12) and m["rewards/accuracies"] == 0.0
    assert m["distance/policy_chosen"] == pytest.approx(m["distance/ref_chosen"])


def test_kcdpo_metrics_are_means():
    rng = np.random.default_rng(8)
    H, Hr, Hw, Hl = (t64(rng.normal(size=(6, 2, 3))) for _ in range(4))
    out = kcdpo_loss(H, Hr, Hw, Hl, 3.0, "avgpool", "cosine")
    m = out.metrics()
    k_pw = [np_kernel(H[i].numpy(), Hw[i].numpy(), "avgpool", "cosine") for i in range(6)]
    assert m["distance/policy_chosen"] == pytest.approx(sum(k_pw) / 6, rel=1e-9)
    k_wl = [np_kernel(Hw[i].numpy(), Hl[i].numpy(), "avgpool", "cosine") for i in range(6)]
    assert m["distance/chosen_rejected"] == pytest.approx(sum(k_wl) / 6, rel=1e-9)
    margins = (out.chosen_rewards - out.rejected_rewards).numpy()
    assert m["rewards/margins"] == pytest.approx(float(margins.mean()), rel=1e-9)
    assert m["rewards/accuracies"] == pytest.approx(float((margins > 0).mean()))


@pytest.mark.parametrize(("agg", "dist"), KERNELS)
def test_kcdpo_descent_moves_towards_chosen(agg, dist):
    """A gradient step on H lowers the loss and brings H closer to H_w relative to H_l."""
    torch.manual_seed(0)
    Hr, Hw, Hl = (torch.randn(4, 3, 5, dtype=torch.float64) for _ in range(3))
    H = Hr.clone().requires_grad_(True)
    out = kcdpo_loss(H, Hr, Hw, Hl, 3.0, agg, dist)
    out.loss.backward()
    H2 = (H - 0.01 * H.grad).detach()
    out2 = kcdpo_loss(H2, Hr, Hw, Hl, 3.0, agg, dist)
    assert out2.loss.item() < out.loss.item()
    assert out2.metrics()["rewards/margins"] > 0


def test_kcdpo_rejects_bad_arguments():
    H = torch.randn(2, 3, 4)
    with pytest.raises(ValueError):
        kcdpo_loss(H, H, H, torch.randn(2, 3, 5), 3.0)
    with pytest.raises(ValueError):
        kcdpo_loss(H, H, H, H, 0.0)


# ---------------------------------------------------------------------------------------------- SFT
def test_sft_discrete_is_per_token_nll():
    logps = torch.tensor([-100.0, -50.0], requires_grad=True)
    out = sft_discrete_loss(logps, 25)
    assert torch.allclose(out.losses, torch.tensor([4.0, 2.0]))
    out2 = sft_discrete_loss(logps, torch.tensor([50, 10]))
    assert torch.allclose(out2.losses, torch.tensor([2.0, 5.0]))
    out.loss.backward()
    assert (logps.grad < 0).all()  # raising log pi(z_w) lowers the loss
    assert set(out.metrics()) == {"logps/chosen", "nll/per_token"}
    with pytest.raises(ValueError):
        sft_discrete_loss(logps, 0)


@pytest.mark.parametrize(("agg", "dist"), KERNELS)
def test_sft_continuous_is_kernel_to_chosen(agg, dist):
    rng = np.random.default_rng(9)
    H, Hw = rng.normal(size=(3, 4, 2)), rng.normal(size=(3, 4, 2))
    out = sft_continuous_loss(t64(H), t64(Hw), agg, dist)
    for i in range(3):
        assert out.losses[i].item() == pytest.approx(np_kernel(H[i], Hw[i], agg, dist), rel=1e-10, abs=1e-12)
    assert set(out.metrics()) == {"distance/policy_chosen"}
    assert sft_continuous_loss(t64(Hw), t64(Hw), agg, dist).loss.item() == pytest.approx(0.0, abs=1e-12)


# ------------------------------------------------------------------------------------------ metrics
def loss_inputs(device: str, dtype: torch.dtype = torch.float32, grad: bool = True) -> dict[str, torch.Tensor]:
    """Random DPO log-probs [4] and KC-DPO features [4, 3, 5] on ``device``; policy ones require grad."""
    g = torch.Generator().manual_seed(15)
    shapes = {"pc": (4,), "pr": (4,), "rc": (4,), "rr": (4,),
              "H": (4, 3, 5), "Hr": (4, 3, 5), "Hw": (4, 3, 5), "Hl": (4, 3, 5)}
    x = {k: torch.randn(*shape, generator=g, dtype=dtype).to(device) for k, shape in shapes.items()}
    for k in ("pc", "pr", "H"):
        x[k].requires_grad_(grad)
    x["lengths"] = torch.tensor([7, 3, 5, 1], device=device)
    return x


def all_outputs(x: dict[str, torch.Tensor], lengths: bool = True) -> dict[str, object]:
    """One output of every loss. ``lengths`` adds SFT with a [B] num_tokens tensor, whose validation
    waits for the device by design."""
    pc, pr, rc, rr = x["pc"], x["pr"], x["rc"], x["rr"]
    outs = {
        "dpo": dpo_loss(pc, pr, rc, rr, beta=0.2),
        "cdpo": cdpo_loss(pc, pr, rc, rr, beta=0.2, label_smoothing=0.1),
        "rdpo": rdpo_loss(pc, pr, rc, rr, beta=0.2, label_smoothing=0.1),
        "ipo": ipo_loss(pc, pr, rc, rr, beta=0.2),
        "kcdpo": kcdpo_loss(x["H"], x["Hr"], x["Hw"], x["Hl"], 3.0, "avgpool", "cosine"),
        "sft_discrete": sft_discrete_loss(pc - 10.0, 7),
        "sft_continuous": sft_continuous_loss(x["H"], x["Hw"], "none", "euclidean"),
    }
    if lengths:
        outs["sft_discrete_lengths"] = sft_discrete_loss(pc - 10.0, x["lengths"])
    return outs


METRIC_KEYS = {"dpo": DPO_KEYS, "cdpo": DPO_KEYS, "rdpo": DPO_KEYS, "ipo": DPO_KEYS, "kcdpo": KCDPO_KEYS,
               "sft_discrete": {"logps/chosen", "nll/per_token"},
               "sft_discrete_lengths": {"logps/chosen", "nll/per_token"},
               "sft_continuous": {"distance/policy_chosen"}}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_metric_tensors_equal_metrics(dtype):
    for name, out in all_outputs(loss_inputs("cpu", dtype)).items():
        tensors, floats = out.metric_tensors(), out.metrics()
        assert set(tensors) == set(floats) == METRIC_KEYS[name], name
        for key, t in tensors.items():
            assert isinstance(t, torch.Tensor) and t.dim() == 0 and t.dtype == torch.float64, (name, key)
            assert not t.requires_grad and t.grad_fn is None, (name, key)
            assert t.device.type == "cpu"
            assert isinstance(floats[key], float) and floats[key] == t.item(), (name, key)
        # and they are the float64 batch means of the per-example statistics
        if name in ("dpo", "cdpo", "rdpo", "ipo"):
            want = out.chosen_rewards.double().mean().item()
            assert tensors["rewards/chosen"].item() == pytest.approx(want, rel=1e-12, abs=1e-15)


def test_metric_tensors_stay_on_the_input_device():
    """On the meta device nothing is ever computed or copied: any host transfer or .item() would raise."""
    outs = all_outputs(loss_inputs("meta", grad=False), lengths=False)
    for name, out in outs.items():
        assert out.losses.device.type == "meta", name
        for key, t in out.metric_tensors().items():
            assert t.device.type == "meta" and t.dim() == 0 and t.dtype == torch.float64, (name, key)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_losses_and_metric_tensors_do_not_synchronise_on_cuda():
    x = loss_inputs("cuda")  # the host-to-device copies of the inputs do wait; they are not under test
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        outs = all_outputs(x, lengths=False)
        assert len(outs) == 7
        for name, out in outs.items():
            out.loss.backward(retain_graph=True)
            for key, t in out.metric_tensors().items():
                assert t.device.type == "cuda" and t.dim() == 0, (name, key)
    finally:
        torch.cuda.set_sync_debug_mode("default")


# ------------------------------------------------------------------------------ properties, stability
finite_logp = st.floats(min_value=-1e6, max_value=1e6, allow_nan=False, allow_infinity=False, width=32)
logp_vectors = st.integers(1, 6).flatmap(lambda n: st.tuples(*[st.lists(finite_logp, min_size=n, max_size=n)] * 4))


@settings(max_examples=60, deadline=None)
@given(logps=logp_vectors, beta=st.floats(1e-3, 10.0), eps=st.sampled_from([1e-6, 0.1, 0.25, 0.49]),
       dtype=st.sampled_from([torch.float32, torch.bfloat16]))
def test_dpo_family_finite(logps, beta, eps, dtype):
    pc, pr, rc, rr = (torch.tensor(x, dtype=dtype) for x in logps)
    outs = {"dpo": dpo_loss(pc, pr, rc, rr, beta), "ipo": ipo_loss(pc, pr, rc, rr, beta),
            "cdpo": cdpo_loss(pc, pr, rc, rr, beta, eps), "rdpo": rdpo_loss(pc, pr, rc, rr, beta, eps)}
    for name, out in outs.items():
        assert out.losses.shape == pc.shape
        assert torch.isfinite(out.losses).all()
        if name != "rdpo":  # rDPO is an unbiased estimate, not a bound: it goes negative at large margins
            assert (out.losses >= 0).all()
        m = out.metrics()
        assert set(m) == DPO_KEYS and all(math.isfinite(v) for v in m.values())
    for fn, extra in ((dpo_loss, ()), (ipo_loss, ()), (cdpo_loss, (eps,)), (rdpo_loss, (eps,))):
        leaf = pc.clone().requires_grad_(True)
        fn(leaf, pr, rc, rr, beta, *extra).loss.backward()
        assert torch.isfinite(leaf.grad).all()


def feature_arrays(bound: float):
    # no subnormals: cosine's true gradient ~ 1/||v|| is not representable in float32 there
    elements = st.floats(-bound, bound, allow_nan=False, allow_infinity=False, allow_subnormal=False, width=32)
    shapes = st.tuples(st.integers(1, 3), st.integers(1, 4), st.integers(1, 5))
    return shapes.flatmap(lambda s: st.tuples(*[hnp.arrays(np.float32, s, elements=elements)] * 4))


@settings(max_examples=40, deadline=None)
@given(feats=feature_arrays(1e4), gamma=st.floats(1e-2, 10.0), kernel=st.sampled_from(KERNELS))
def test_kcdpo_finite_nonnegative(feats, gamma, kernel):
    H, Hr, Hw, Hl = (torch.from_numpy(f) for f in feats)
    H.requires_grad_(True)
    out = kcdpo_loss(H, Hr, Hw, Hl, gamma, *kernel)
    assert out.losses.shape == (H.shape[0],)
    assert torch.isfinite(out.losses).all() and (out.losses >= 0).all()
    m = out.metrics()
    assert set(m) == KCDPO_KEYS and all(math.isfinite(v) for v in m.values())
    out.loss.backward()
    assert torch.isfinite(H.grad).all()


@settings(max_examples=40, deadline=None)
@given(feats=feature_arrays(float(np.finfo(np.float32).max)), agg=st.sampled_from(AGGS))
def test_cosine_kernel_finite_at_any_magnitude(feats, agg):
    a, b = torch.from_numpy(feats[0]).requires_grad_(True), torch.from_numpy(feats[1])
    d = kernel_distance(a, b, agg, "cosine")
    assert torch.isfinite(d).all() and (d >= 0).all() and (d <= 2).all()
    d.sum().backward()
    assert torch.isfinite(a.grad).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_huge_logit_differences_are_stable(dtype):
    big = torch.tensor([1e4, -1e4, 3e4, -3e4], dtype=dtype)
    zero = torch.zeros(4, dtype=dtype)
    variants = [lambda *a: dpo_loss(*a, beta=1.0)]
    for eps in (1e-3, 0.25, 0.49):
        variants += [lambda *a, eps=eps: cdpo_loss(*a, beta=1.0, label_smoothing=eps),
                     lambda *a, eps=eps: rdpo_loss(*a, beta=1.0, label_smoothing=eps)]
    for fn in variants:
        pc = big.clone().requires_grad_(True)
        out = fn(pc, zero, zero, zero)
        assert torch.isfinite(out.losses).all()
        out.loss.backward()
        assert torch.isfinite(pc.grad).all() and (pc.grad != 0).any()
        assert all(math.isfinite(v) for v in out.metrics().values())
    # both smoothed losses are linear at both ends, with the hand-derived slopes (not inf, not nan)
    eps = 0.25
    c = cdpo_loss(big, zero, zero, zero, beta=1.0, label_smoothing=eps).losses.float()
    r = rdpo_loss(big, zero, zero, zero, beta=1.0, label_smoothing=eps).losses.float()
    h = big.float()
    assert c[2].item() == pytest.approx(eps * h[2].item(), rel=1e-2)
    assert c[3].item() == pytest.approx(-(1 - eps) * h[3].item(), rel=1e-2)
    assert r[2].item() == pytest.approx(-eps * h[2].item() / (1 - 2 * eps), rel=1e-2)
    assert r[3].item() == pytest.approx(-(1 - eps) * h[3].item() / (1 - 2 * eps), rel=1e-2)
    plain = dpo_loss(big, zero, zero, zero, beta=1.0).losses.float()
    # right-ranked pairs cost ~0, wrong-ranked ones cost ~|beta h| (linear, not inf)
    h = big.float()
    assert plain[0].item() == pytest.approx(0.0, abs=1e-6)
    assert plain[1].item() == pytest.approx(-h[1].item(), rel=1e-2)
    # KC-DPO with far-apart features: a bracket in the 1e8 range still gives finite loss and gradient
    H = torch.full((2, 4, 8), 1e3).requires_grad_(True)
    out = kcdpo_loss(H, torch.zeros(2, 4, 8), torch.full((2, 4, 8), -1e3), torch.full((2, 4, 8), 2e3), 3.0,
                     "none", "euclidean")
    assert torch.isfinite(out.losses).all() and out.losses.min().item() > 1e6
    out.loss.backward()
    assert torch.isfinite(H.grad).all()

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
    dpo_loss,
    ipo_loss,
    kcdpo_loss,
    kernel_distance,
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
              "distance/ref_rejected"}


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
@pytest.mark.parametrize("eps", [0.0, 0.1, 0.3])
def test_dpo_matches_hand_computation(eps):
    rng = np.random.default_rng(0)
    pc, pr, rc, rr = rand_logps(rng, 16)
    beta = 0.2
    out = dpo_loss(t64(pc), t64(pr), t64(rc), t64(rr), beta=beta, label_smoothing=eps)
    for i in range(16):
        h = (pc[i] - rc[i]) - (pr[i] - rr[i])
        want = (1 - eps) * neg_log_sigmoid(beta * h) + eps * neg_log_sigmoid(-beta * h)
        assert out.losses[i].item() == pytest.approx(want, rel=1e-12, abs=1e-12)
        assert out.chosen_rewards[i].item() == pytest.approx(beta * (pc[i] - rc[i]), rel=1e-12)
        assert out.rejected_rewards[i].item() == pytest.approx(beta * (pr[i] - rr[i]), rel=1e-12)
    assert out.loss.item() == pytest.approx(float(np.mean(out.losses.numpy())), rel=1e-12)


def test_dpo_label_smoothing_zero_is_plain_dpo():
    rng = np.random.default_rng(1)
    args = [t64(x) for x in rand_logps(rng, 8)]
    plain = dpo_loss(*args, beta=0.5)
    smoothed0 = dpo_loss(*args, beta=0.5, label_smoothing=0.0)
    assert torch.equal(plain.losses, smoothed0.losses)
    # and eps > 0 is a different, larger loss wherever the pair is already ranked right
    smoothed = dpo_loss(*args, beta=0.5, label_smoothing=0.2)
    right = plain.chosen_rewards > plain.rejected_rewards
    assert (smoothed.losses[right] > plain.losses[right]).all()


def test_dpo_metrics_by_hand():
    pc, pr = np.array([-10.0, -20.0, -5.0]), np.array([-12.0, -15.0, -5.0])
    rc, rr = np.array([-11.0, -19.0, -6.0]), np.array([-11.0, -16.0, -4.0])
    beta = 0.5
    m = dpo_loss(t64(pc), t64(pr), t64(rc), t64(rr), beta=beta).metrics()
    assert set(m) == DPO_KEYS and all(isinstance(v, float) for v in m.values())
    cr = [beta * (a - b) for a, b in zip(pc, rc, strict=True)]  # 0.5, -0.5, 0.5
    rj = [beta * (a - b) for a, b in zip(pr, rr, strict=True)]  # -0.5, 0.5, -0.5
    assert m["rewards/chosen"] == pytest.approx(sum(cr) / 3)
    assert m["rewards/rejected"] == pytest.approx(sum(rj) / 3)
    assert m["rewards/margins"] == pytest.approx((sum(cr) - sum(rj)) / 3)
    assert m["rewards/accuracies"] == pytest.approx(2 / 3)
    assert m["logps/chosen"] == pytest.approx(-35 / 3)
    assert m["logps/rejected"] == pytest.approx(-32 / 3)


@pytest.mark.parametrize("eps", [0.0, 0.2])
def test_dpo_gradient_signs(eps):
    rng = np.random.default_rng(2)
    pc, pr, rc, rr = (t64(x, grad=True) for x in rand_logps(rng, 6, scale=1.0))
    dpo_loss(pc, pr, rc, rr, beta=0.2, label_smoothing=eps).loss.backward()
    if eps == 0.0:
        # raising the chosen log-prob (or lowering the rejected one) always lowers plain DPO's loss
        assert (pc.grad < 0).all() and (pr.grad > 0).all()
        assert (rc.grad > 0).all() and (rr.grad < 0).all()
    # with smoothing the sign flips only once the margin passes the optimum beta*h* = log((1-eps)/eps)
    assert torch.allclose(pc.grad, -pr.grad) and torch.allclose(pc.grad, -rc.grad)


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


def test_dpo_rejects_bad_arguments():
    x = torch.zeros(3)
    with pytest.raises(ValueError):
        dpo_loss(x, x, x, torch.zeros(4), beta=0.1)
    with pytest.raises(ValueError):
        dpo_loss(x, x, x, x, beta=0.0)
    with pytest.raises(ValueError):
        dpo_loss(x, x, x, x, beta=0.1, label_smoothing=0.7)


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


# ------------------------------------------------------------------------------ properties, stability
finite_logp = st.floats(min_value=-1e6, max_value=1e6, allow_nan=False, allow_infinity=False, width=32)
logp_vectors = st.integers(1, 6).flatmap(lambda n: st.tuples(*[st.lists(finite_logp, min_size=n, max_size=n)] * 4))


@settings(max_examples=60, deadline=None)
@given(logps=logp_vectors, beta=st.floats(1e-3, 10.0), eps=st.sampled_from([0.0, 0.1, 0.5]))
def test_dpo_ipo_finite_nonnegative(logps, beta, eps):
    pc, pr, rc, rr = (torch.tensor(x, dtype=torch.float32, requires_grad=True) for x in logps)
    for out in (dpo_loss(pc, pr, rc, rr, beta, eps), ipo_loss(pc, pr, rc, rr, beta)):
        assert out.losses.shape == pc.shape
        assert torch.isfinite(out.losses).all() and (out.losses >= 0).all()
        m = out.metrics()
        assert set(m) == DPO_KEYS and all(math.isfinite(v) for v in m.values())
    dpo_loss(pc, pr, rc, rr, beta, eps).loss.backward()
    assert torch.isfinite(pc.grad).all()


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
    for eps in (0.0, 0.25):
        pc = big.clone().requires_grad_(True)
        out = dpo_loss(pc, zero, zero, zero, beta=1.0, label_smoothing=eps)
        assert torch.isfinite(out.losses).all()
        out.loss.backward()
        assert torch.isfinite(pc.grad).all()
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

"""GBC (core/gbc.py, eqs. 13-14) and the dense feature table (core/densetable.py).

References are independent of the code under test: per-sample gradients by a loop of
``torch.autograd.grad`` (label-free loss written as ``logsumexp(z)``, which has the same gradient
``sum_c p_c grad z_c``), importances from those per-sample gradients, inner products in float64.
"""

from __future__ import annotations

import copy
import math
import pickle

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pivotal_ray.config import FeatureConfig
from pivotal_ray.core.densetable import dense_schema, read_dense_table, read_feature_table, table_kind
from pivotal_ray.core.features import EXTRACTORS, rbc_factors
from pivotal_ray.core.featuretable import DenseFeatures, FactorFeatures, factor_columns, factor_schema
from pivotal_ray.core.gbc import (PROJECTIONS, GBCExtractor, draw_tensors, label_aware_loss, label_free_loss,
                                  per_sample_grads, tensor_importance)
from pivotal_ray.core.seeding import derive_seed, numpy_rng, torch_generator


class TinyNet(nn.Module):
    """Model contract (embed + head) with BatchNorm and dropout, so eval mode matters; 8 tensors."""

    def __init__(self, *, seed: int = 0) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(5, 7), nn.BatchNorm1d(7), nn.Tanh(), nn.Dropout(0.5),
                                  nn.Linear(7, 4), nn.Tanh())
        self.head = nn.Linear(4, 3)
        g = torch_generator(seed, "tinynet")
        with torch.no_grad():  # every value from a local generator: no global RNG
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g))
            self.body[1].running_mean.copy_(torch.randn(7, generator=g))
            self.body[1].running_var.copy_(torch.rand(7, generator=g) + 0.5)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(x))


def _batch(n: int = 10, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch_generator(seed, "batch")
    return torch.randn(n, 5, generator=g), torch.randint(0, 3, (n,), generator=g)


def _loop_grads(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, label_aware: bool) -> dict[str, torch.Tensor]:
    """Reference: one autograd call per sample in eval mode; name -> (n, *shape) float64."""
    model.eval()
    names = [n for n, _ in model.named_parameters()]
    out: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    for j in range(x.shape[0]):
        z = model(x[j:j + 1])
        # d logsumexp(z) = sum_c p_c dz_c: the label-free gradient, written without stopgrad
        loss = F.cross_entropy(z, y[j:j + 1]) if label_aware else torch.logsumexp(z, 1).sum()
        for n, g in zip(names, torch.autograd.grad(loss, list(model.parameters()))):
            out[n].append(g.double())
    model.train()
    return {n: torch.stack(v) for n, v in out.items()}


def _flat(grads: dict[str, torch.Tensor], names) -> list[np.ndarray]:
    return [grads[n].reshape(grads[n].shape[0], -1).double().numpy() for n in names]


# ---------------------------------------------------------------------------------------------
# per-sample gradients and the label-free loss
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("label_aware", [False, True])
def test_batched_per_sample_grads_equal_the_autograd_loop(label_aware: bool) -> None:
    model = TinyNet().train()  # train mode on purpose: GBC must switch to eval and back
    x, y = _batch()
    names = [n for n, _ in model.named_parameters()]
    loss = label_aware_loss if label_aware else label_free_loss
    got = per_sample_grads(model, x, y if label_aware else None, names=names, loss=loss)
    assert model.training  # mode restored
    ref = _loop_grads(model, x, y, label_aware=label_aware)
    for n in names:
        assert got[n].shape == (10, *dict(model.named_parameters())[n].shape)
        np.testing.assert_allclose(got[n].double().numpy(), ref[n].numpy(), rtol=1e-5, atol=1e-6, err_msg=n)


def test_label_free_gradient_identity() -> None:
    """eq. S15: grad CE_j = grad[sum_c sg(p_c) z_c] - grad z_{j,y_j} for every tensor; on the head
    weight the label-free gradient is RBC's p x~^T (eq. 12)."""
    model = TinyNet(seed=4)
    x, y = _batch(seed=5)
    names = [n for n, _ in model.named_parameters()]
    ce = per_sample_grads(model, x, y, names=names, loss=label_aware_loss)
    free = per_sample_grads(model, x, None, names=names, loss=label_free_loss)
    zy = per_sample_grads(model, x, y, names=names, loss=lambda z, t: z.gather(1, t[:, None])[:, 0])
    for n in names:
        torch.testing.assert_close(ce[n], free[n] - zy[n], rtol=1e-5, atol=1e-6)
    A, X = rbc_factors(model, x, label_aware=False)  # (n, C), (n, d)
    torch.testing.assert_close(free["head.weight"], A[:, :, None] * X[:, None, :], rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# importance, draws, the extractor's blocks
# ---------------------------------------------------------------------------------------------


def _importance_ref(ref: dict[str, torch.Tensor], names) -> np.ndarray:
    """A^(l) = ||mean_j grad_l f_j||^2 from per-sample gradients (independent of one-backward-per-batch)."""
    return np.array([float(ref[n].mean(0).square().sum()) for n in names])


def test_importance_from_batched_backward_matches_per_sample_mean() -> None:
    model = TinyNet(seed=2)
    x, y = _batch(n=13, seed=3)
    names = [n for n, _ in model.named_parameters()]
    batches = [(x[:5], y[:5]), (x[5:11], y[5:11]), (x[11:], y[11:])]
    imp, N = tensor_importance(model, batches, loss=label_aware_loss, names=names)
    assert N == 13
    ref = _importance_ref(_loop_grads(model, x, y, label_aware=True), names)
    np.testing.assert_allclose(imp, ref, rtol=1e-5)


def test_extractor_blocks_are_scaled_per_sample_grads() -> None:
    """Block r = grad_{l_r} f_j / sqrt(R p_{l_r}), zero-padded to B; rows registered as "gbc"."""
    model = TinyNet(seed=6)
    x, y = _batch(n=8, seed=7)
    R = 6
    ext = EXTRACTORS.get("gbc")(model=model, cfg=FeatureConfig(kind="gbc", num_layers=R, proj_dim=1000), seed=11)
    assert isinstance(ext, GBCExtractor) and ext.needs_fit
    ext.fit([(x[:3], y[:3]), (x[3:], y[3:])])
    names = ext.names
    ref = _loop_grads(model, x, y, label_aware=False)
    p = _importance_ref(ref, names)
    p /= p.sum()
    idx, p_code = draw_tensors(ext.draws.importance, num_draws=R, seed=11)
    np.testing.assert_allclose(p_code, p, rtol=1e-5)
    np.testing.assert_array_equal(ext.draws.index, idx)
    assert ext.block == 35 and ext.width == R * 35  # largest tensor: body.0.weight, 7 x 5
    g = ext.extract(x, None)["g"]
    assert g.shape == (8, ext.width) and g.dtype == np.float32
    flat = dict(zip(names, _flat(ref, names)))
    for r, l in enumerate(idx):
        want = flat[names[l]] / math.sqrt(R * p[l])  # (n, P_l)
        blk = g[:, r * ext.block:(r + 1) * ext.block]
        np.testing.assert_allclose(blk[:, :want.shape[1]], want, rtol=1e-4, atol=1e-6)
        assert not blk[:, want.shape[1]:].any()  # padding is zeros
    rows = ext.rows(sample_id=np.arange(100, 108), snapshot=2, epoch=9, x=x, y=None)
    assert set(rows) == {"sample_id", "snapshot", "epoch", "g"} and (rows["snapshot"] == 2).all()


def test_sampled_inner_product_is_unbiased() -> None:
    """Mean over many draws of sum_r <g_i^l_r, g_j^l_r> / (R p_l_r) -> <g_i, g_j> (all tensors).

    Tolerance: the single-draw estimate X = <g_i^l, g_j^l>/p_l has variance
    V = sum_l ip_l^2 / p_l - ip^2 (exact, from the reference gradients); the mean of R S draws has
    standard deviation sqrt(V / (R S)); we allow 5 of them (fixed seeds, so the test is
    deterministic; a correct estimator lands outside with probability < 1e-6 per pair).
    """
    model = TinyNet(seed=8)
    x, y = _batch(n=4, seed=9)
    R, S = 5, 2000
    ext = GBCExtractor(model=model, cfg=FeatureConfig(kind="gbc", num_layers=R), seed=0)
    ext.fit([(x, y)])
    names = ext.names
    flat = _flat(_loop_grads(model, x, y, label_aware=False), names)
    ip_l = np.stack([f @ f.T for f in flat])  # (L, n, n) per-tensor inner products (eq. 13 terms)
    full = ip_l.sum(0)  # (n, n)
    est = np.zeros_like(full)
    for s in range(S):
        idx, p = draw_tensors(ext.draws.importance, num_draws=R, seed=s)
        est += (ip_l[idx] / (R * p[idx])[:, None, None]).sum(0)
    est /= S
    V = (ip_l ** 2 / p[:, None, None]).sum(0) - full ** 2  # (n, n)
    tol = 5 * np.sqrt(V / (R * S)) + 1e-12
    assert (np.abs(est - full) <= tol).all(), (est, full, tol)
    assert np.abs(est - full).max() > 0  # it is an estimate, not the exact sum


def test_draws_follow_importance_and_skip_zero_tensors() -> None:
    imp = np.array([0.0, 1.0, 3.0, 0.0, 4.0])
    counts = np.zeros(5)
    for s in range(400):
        counts += np.bincount(draw_tensors(imp, num_draws=5, seed=s)[0], minlength=5)
    assert counts[0] == counts[3] == 0
    freq = counts / counts.sum()  # 2000 draws: sd of a frequency <= 0.012
    np.testing.assert_allclose(freq[[1, 2, 4]], [0.125, 0.375, 0.5], atol=0.05)
    with pytest.raises(ValueError, match="not all zero"):
        draw_tensors(np.zeros(3), num_draws=2, seed=0)


def test_determinism_and_errors() -> None:
    model = TinyNet(seed=10)
    x, y = _batch(n=9, seed=11)
    cfg = FeatureConfig(kind="gbc", num_layers=4, proj_dim=8, label_aware=True)

    def run(seed: int, split: int) -> tuple[tuple[str, ...], np.ndarray]:
        e = GBCExtractor(model=model, cfg=cfg, seed=seed)
        e.fit([(x[:split], y[:split]), (x[split:], y[split:])])
        return e.draws.names, e.extract(x, y)["g"]

    n1, g1 = run(3, 4)
    n2, g2 = run(3, 4)
    assert n1 == n2 and np.array_equal(g1, g2)  # same seed, same data order: identical
    n3, g3 = run(3, 6)  # other batch boundaries: same draws (A^(l) equal to rounding)
    assert n1 == n3
    np.testing.assert_allclose(g1, g3, rtol=1e-5, atol=1e-6)
    assert any(run(s, 4)[0] != n1 for s in (4, 5, 6, 7))  # the seed matters
    e = GBCExtractor(model=model, cfg=cfg, seed=0)
    with pytest.raises(RuntimeError, match="fit"):
        e.extract(x, y)
    e.fit([(x, y)])
    with pytest.raises(ValueError, match="label_aware"):
        e.extract(x, None)
    with pytest.raises(ValueError, match="num_layers"):
        GBCExtractor(model=model, cfg=FeatureConfig(kind="gbc", num_layers=0), seed=0)


def test_projection_of_large_blocks_keeps_batches_consistent() -> None:
    """A block longer than proj_dim is projected with the same S for every batch (chunked samples too)."""
    model = TinyNet(seed=12)
    x, _ = _batch(n=7, seed=13)
    cfg = FeatureConfig(kind="gbc", num_layers=3, proj_dim=6)
    e = GBCExtractor(model=model, cfg=cfg, seed=1, chunk_bytes=1)  # one sample per vmap chunk
    e.fit([(x, None)])
    assert e.block == 6 and e.width == 18
    whole = e.extract(x, None)["g"]
    parts = np.concatenate([e.extract(x[:3], None)["g"], e.extract(x[3:], None)["g"]])
    np.testing.assert_allclose(whole, parts, rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------------------------------------------
# random projections
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["countsketch", "gaussian"])
def test_projection_is_unbiased(kind: str) -> None:
    """Mean of <Sa, Sb> over S seeds within 5 sd of <a, b>; per-seed variance is at most
    (||a||^2 ||b||^2 + <a,b>^2) / k for both kinds (Gaussian: equality)."""
    proj = PROJECTIONS.get(kind)
    gen = torch_generator(0, "vectors")
    ab = torch.randn(2, 300, generator=gen, dtype=torch.float64)
    ab[1] += 0.7 * ab[0]  # correlated, so <a, b> is far from 0
    k, S = 16, 400
    vals = np.array([float(proj(ab, dim=k, seed=s).prod(0).sum()) for s in range(S)])
    a, b = ab.numpy()
    exact = a @ b
    var = ((a @ a) * (b @ b) + exact ** 2) / k
    assert abs(vals.mean() - exact) <= 5 * math.sqrt(var / S)
    assert vals.var() <= 1.3 * var  # sampling sd of a variance over 400 draws is ~10%


@pytest.mark.parametrize("kind", ["countsketch", "gaussian"])
def test_projection_within_jl_bound(kind: str) -> None:
    """Dasgupta-Gupta: k >= 4 ln(n) / (eps^2/2 - eps^3/3) keeps all n(n-1)/2 squared distances
    within (1 +- eps) with probability >= 1 - 1/n; polarisation then bounds the inner products of
    unit vectors by eps. (For countsketch the guarantee needs coordinates that are small next to
    the norm, Kane & Nelson 2014: true of these Gaussian vectors.) Fixed seed."""
    n, P, k = 20, 3000, 512
    eps = next(e for e in np.linspace(0.01, 0.99, 9801) if k >= 4 * math.log(n) / (e**2 / 2 - e**3 / 3))
    U = torch.randn(n, P, generator=torch_generator(1, "jl"), dtype=torch.float64)
    U /= U.norm(dim=1, keepdim=True)
    V = PROJECTIONS.get(kind)(U, dim=k, seed=3).numpy()
    U = U.numpy()
    iu = np.triu_indices(n, 1)
    d_true = ((U[:, None] - U[None]) ** 2).sum(-1)[iu]
    d_proj = ((V[:, None] - V[None]) ** 2).sum(-1)[iu]
    assert (np.abs(d_proj / d_true - 1) <= eps).all()
    assert (np.abs(V @ V.T - U @ U.T)[iu] <= eps).all()


@pytest.mark.parametrize("kind", ["countsketch", "gaussian"])
def test_projection_matrix_comes_from_the_seed_alone(kind: str) -> None:
    """Several generated column pieces (P > one piece); rows projected alone equal rows projected
    together (S does not depend on the batch); another seed gives another S."""
    proj = PROJECTIONS.get(kind)
    k = 512
    P = 70_000 if kind == "countsketch" else 40_000  # pieces of 65536 / 32768 columns
    g = torch.randn(3, P, generator=torch_generator(2, "big"), dtype=torch.float64)
    whole = proj(g, dim=k, seed=5)
    np.testing.assert_allclose(torch.cat([proj(g[:1], dim=k, seed=5), proj(g[1:], dim=k, seed=5)]).numpy(),
                               whole.numpy(), rtol=1e-10, atol=1e-10)
    assert not torch.allclose(proj(g, dim=k, seed=6), whole)
    assert whole.shape == (3, k)


# ---------------------------------------------------------------------------------------------
# dense table
# ---------------------------------------------------------------------------------------------


def _write_dense(path, sid: np.ndarray, snap: np.ndarray, g: np.ndarray) -> None:
    W = g.shape[1]
    col = pa.FixedSizeListArray.from_arrays(pa.array(g.reshape(-1).astype(np.float32)), type=pa.list_(pa.float32(), W))
    t = pa.table({"sample_id": pa.array(sid, pa.int64()), "snapshot": pa.array(snap, pa.int32()),
                  "epoch": pa.array(snap * 10, pa.int32()), "g": col}, schema=dense_schema(W))
    pq.write_table(t, path)


def test_dense_table_round_trip(tmp_path) -> None:
    rng = numpy_rng(0, "dense")
    n, K, W = 7, 3, 4
    ids = rng.permutation(np.arange(100, 100 + n))
    G = rng.standard_normal((n, K, W)).astype(np.float32)  # by position in ids
    sid, snap = np.repeat(ids, K), np.tile(np.arange(K), n)
    rows = rng.permutation(n * K)  # any row order, split over two files
    g = G.reshape(n * K, W)
    _write_dense(tmp_path / "a.parquet", sid[rows[:9]], snap[rows[:9]], g[rows[:9]])
    _write_dense(tmp_path / "b.parquet", sid[rows[9:]], snap[rows[9:]], g[rows[9:]])
    assert table_kind(tmp_path) == "dense"
    feats = read_feature_table(tmp_path)
    assert isinstance(feats, DenseFeatures)
    order = np.argsort(ids)
    np.testing.assert_array_equal(feats.sample_id, ids[order])
    np.testing.assert_array_equal(feats.G, G[order].reshape(n, K * W))
    # inner products of the concatenation = sum over snapshot blocks
    ref = np.einsum("ikw,jkw->ij", G[order].astype(np.float64), G[order].astype(np.float64))
    np.testing.assert_allclose(feats.G.astype(np.float64) @ feats.G.T.astype(np.float64), ref, rtol=1e-6)
    for pick in (ids[:3], ids[[0, 2, 5]]):  # the second leaves gaps inside its id range: rows are dropped
        some = read_dense_table(tmp_path, sample_ids=pick)
        np.testing.assert_array_equal(some.sample_id, np.sort(pick))
        at = np.searchsorted(ids[order], np.sort(pick))
        np.testing.assert_array_equal(some.G, G[order][at].reshape(len(pick), K * W))
    (tmp_path / "b.parquet").unlink()
    with pytest.raises(ValueError, match="incomplete"):
        read_dense_table(tmp_path)


def test_read_feature_table_dispatches_on_columns(tmp_path) -> None:
    rng = numpy_rng(1, "factor")
    A, X = rng.standard_normal((4, 3)), rng.standard_normal((4, 2))
    cols = factor_columns(np.arange(4), 0, 5, A, X)
    t = pa.table({c: (pa.FixedSizeListArray.from_arrays(pa.array(v.reshape(-1)), type=pa.list_(pa.float32(), v.shape[1]))
                      if v.ndim == 2 else pa.array(v)) for c, v in cols.items()}, schema=factor_schema(3, 2))
    pq.write_table(t, tmp_path / "f.parquet")
    assert table_kind(tmp_path) == "factor"
    feats = read_feature_table(tmp_path)
    assert isinstance(feats, FactorFeatures) and feats.A.shape == (4, 1, 3)
    pq.write_table(pa.table({"sample_id": pa.array([1], pa.int64())}), tmp_path / "f.parquet")
    with pytest.raises(ValueError, match="re-run extract_features"):
        read_feature_table(tmp_path)


# ---------------------------------------------------------------------------------------------
# mutation audit: properties no earlier test pinned down
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["countsketch", "gaussian"])
def test_projection_is_unbiased_for_non_centred_vectors(kind: str) -> None:
    """Gradient blocks are rarely centred (ReLU features, softmax factors): with mean-1 vectors
    a projection without random signs would add ``(sum a)(sum b) / k``, about 100 sd here."""
    proj = PROJECTIONS.get(kind)
    ab = 1.0 + torch.randn(2, 300, generator=torch_generator(3, "vectors"), dtype=torch.float64)
    k, S = 16, 400
    vals = np.array([float(proj(ab, dim=k, seed=s).prod(0).sum()) for s in range(S)])
    a, b = ab.numpy()
    var = ((a @ a) * (b @ b) + (a @ b) ** 2) / k
    assert abs(vals.mean() - a @ b) <= 5 * math.sqrt(var / S)


@pytest.mark.parametrize("kind", ["countsketch", "gaussian"])
def test_projection_pieces_are_independent(kind: str) -> None:
    """S is generated in column pieces; each piece must be its own random matrix. a = [u, 0] and
    b = [0, u] (u filling one piece) are orthogonal; if two pieces shared their matrix, Sa = Sb
    and <Sa, Sb> = ||Su||^2 ~ ||u||^2 instead of 0 +- ||u||^2 / sqrt(k)."""
    k = 512
    piece = 1 << 16 if kind == "countsketch" else (1 << 24) // k  # the pieces' widths
    u = torch.randn(piece, generator=torch_generator(4, "piece"), dtype=torch.float64)
    ab = torch.zeros(2, 2 * piece, dtype=torch.float64)
    ab[0, :piece], ab[1, piece:] = u, u
    for seed in range(3):
        Sa, Sb = PROJECTIONS.get(kind)(ab, dim=k, seed=seed)
        assert abs(float(Sa @ Sb)) <= 5 * float(u @ u) / math.sqrt(k)


def test_extraction_keeps_the_callers_mode() -> None:
    model = TinyNet(seed=14).eval()
    x, y = _batch(n=6, seed=15)
    ext = GBCExtractor(model=model, cfg=FeatureConfig(kind="gbc", num_layers=3, label_aware=True), seed=0)
    ext.fit([(x, y)])
    assert not model.training
    ext.extract(x, y)
    assert not model.training  # an eval-mode model is not switched to train mode (dropout, BatchNorm updates)
    model.train()
    ext.extract(x, y)
    assert model.training


def test_frozen_tensors_are_never_drawn() -> None:
    model = TinyNet(seed=16)
    for p in model.body.parameters():
        p.requires_grad_(False)
    x, y = _batch(n=6, seed=17)
    ext = GBCExtractor(model=model, cfg=FeatureConfig(kind="gbc", num_layers=8), seed=0)
    assert ext.names == ["head.weight", "head.bias"]
    ext.fit([(x, None)])
    assert set(ext.draws.names) <= {"head.weight", "head.bias"} and ext.draws.importance.shape == (2,)


def test_label_aware_chunks_use_their_own_labels() -> None:
    """Samples chunked for vmap (chunk_bytes=1: one per chunk) see their own labels: the same rows
    as one chunk, and as the per-sample autograd loop."""
    model = TinyNet(seed=18)
    x, y = _batch(n=7, seed=19)
    cfg = FeatureConfig(kind="gbc", num_layers=4, proj_dim=1000, label_aware=True)
    one = GBCExtractor(model=model, cfg=cfg, seed=2, chunk_bytes=1)
    whole = GBCExtractor(model=model, cfg=cfg, seed=2)
    for e in (one, whole):
        e.fit([(x, y)])
    g = one.extract(x, y)["g"]
    np.testing.assert_allclose(g, whole.extract(x, y)["g"], rtol=1e-6, atol=1e-7)
    flat = dict(zip(one.names, _flat(_loop_grads(model, x, y, label_aware=True), one.names)))
    for r, name in enumerate(one.draws.names):
        want = flat[name] * one.draws.scale[r]
        np.testing.assert_allclose(g[:, r * one.block:r * one.block + want.shape[1]], want, rtol=1e-4, atol=1e-6)


def test_blocks_no_longer_than_proj_dim_are_kept_exactly() -> None:
    """Only blocks that exceed proj_dim are projected: at proj_dim = 28 the 7 x 4 weight (28) and
    every smaller tensor are the scaled gradients themselves; the 7 x 5 weight (35) is projected."""
    model = TinyNet(seed=20)
    x, _ = _batch(n=5, seed=21)
    R = 40  # enough draws to take every tensor with p_l > 0.2 % almost surely
    ext = GBCExtractor(model=model, cfg=FeatureConfig(kind="gbc", num_layers=R, proj_dim=28), seed=3)
    ext.fit([(x, None)])
    assert "body.4.weight" in ext.draws.names and "body.0.weight" in ext.draws.names
    g = ext.extract(x, None)["g"]
    flat = dict(zip(ext.names, _flat(_loop_grads(model, x, x.new_zeros(5).long(), label_aware=False), ext.names)))
    for r, name in enumerate(ext.draws.names):
        blk = g[:, r * 28:(r + 1) * 28]
        if flat[name].shape[1] <= 28:
            np.testing.assert_allclose(blk[:, :flat[name].shape[1]], flat[name] * ext.draws.scale[r], rtol=1e-4, atol=1e-6)
    # two draws of a projected tensor use two independent projections (seeds of their own)
    ext = GBCExtractor(model=model, cfg=FeatureConfig(kind="gbc", num_layers=R, proj_dim=3), seed=3)
    ext.fit([(x, None)])
    g = ext.extract(x, None)["g"]
    name = max(set(ext.draws.names), key=ext.draws.names.count)
    r0, r1 = [r for r, n in enumerate(ext.draws.names) if n == name][:2]
    assert flat[name].shape[1] > 3 and not np.allclose(g[:, r0 * 3:(r0 + 1) * 3], g[:, r1 * 3:(r1 + 1) * 3])


@pytest.mark.parametrize("kind", ["countsketch", "gaussian"])
def test_projection_scale_is_the_projection_of_the_scaled_block(kind: str) -> None:
    """``proj(g, scale=c)`` is ``proj(g * c)`` to the bit, with g as the caller's scratch
    (``overwrite=True``) or not, over two column pieces; a broadcast g is read, never written."""
    proj = PROJECTIONS.get(kind)
    P = 70_000 if kind == "countsketch" else 40_000  # pieces of 65536 / 32768 columns (k = 512)
    g = torch.randn(3, P, generator=torch_generator(30, "block"))
    c = 0.7310585786300049
    want = proj(g * c, dim=512, seed=5)
    assert torch.equal(proj(g, dim=512, seed=5, scale=c), want)
    assert torch.equal(proj(g.clone(), dim=512, seed=5, scale=c, overwrite=True), want)
    row = g[:1].expand(3, P)  # stride 0 along the samples: one row in memory
    assert torch.equal(proj(row, dim=512, seed=5, scale=c, overwrite=True), proj(row * c, dim=512, seed=5))
    assert torch.equal(row[0], g[0])


def test_countsketch_cache_keeps_the_buckets_and_signs_and_changes_no_float(monkeypatch) -> None:
    """Buckets and signs made once per (seed, piece, width, dim, device, dtype) and reused: the same
    output as without a cache; a refit extractor starts a new one (its draws may differ)."""
    from pivotal_ray.core import gbc

    g = torch.randn(4, 70_000, generator=torch_generator(31, "block"))
    cache: dict = {}
    want = gbc.countsketch(g, dim=64, seed=2)
    assert torch.equal(gbc.countsketch(g, dim=64, seed=2, cache=cache), want) and len(cache) == 2  # two pieces
    made = []
    monkeypatch.setattr(gbc, "_cpu_generator", lambda *a: made.append(a) or torch.Generator())
    assert torch.equal(gbc.countsketch(g, dim=64, seed=2, cache=cache, scale=0.5), gbc.countsketch(g * 0.5, dim=64,
                                                                                                  seed=2, cache=cache))
    assert not made  # nothing drawn again
    monkeypatch.undo()
    for dim, P in ((32, 70_000), (64, 70_001)):  # another dim, another last piece: other entries
        assert torch.equal(gbc.countsketch(g[:, :P] if P <= g.shape[1] else torch.cat([g, g[:, :1]], 1), dim=dim,
                                           seed=2, cache=cache),
                           gbc.countsketch(g[:, :P] if P <= g.shape[1] else torch.cat([g, g[:, :1]], 1), dim=dim, seed=2))
    small = gbc.SketchCache(limit=65536 * 12)  # room for one piece's buckets and signs, not two
    assert torch.equal(gbc.countsketch(g, dim=64, seed=2, cache=small), want) and len(small) == 1
    assert small.bytes == 65536 * 12 and torch.equal(gbc.countsketch(g, dim=64, seed=2, cache=small), want)
    for kept in (pickle.loads(pickle.dumps(small)), copy.deepcopy(small)):  # the accounting travels too
        assert (len(kept), kept.bytes, kept.limit) == (1, small.bytes, small.limit)
    assert GBCExtractor(model=TinyNet(seed=24), cfg=FeatureConfig(kind="gbc"), seed=0,
                        chunk_bytes=4000)._projection_cache.limit == 1000  # a quarter of chunk_bytes
    model = TinyNet(seed=24)
    x, _ = _batch(n=5, seed=25)
    ext = GBCExtractor(model=model, cfg=FeatureConfig(kind="gbc", num_layers=6, proj_dim=3), seed=5)
    ext.fit([(x, None)])
    first = ext.extract(x, None)["g"]
    assert ext._projection_cache and np.array_equal(ext.extract(x, None)["g"], first)
    ext.fit([(x, None)])
    assert not ext._projection_cache


@pytest.mark.parametrize("kind", ["countsketch", "gaussian"])
def test_a_tensor_drawn_several_times_is_projected_unchanged_at_every_draw(kind: str) -> None:
    """The extractor projects a tensor's gradients in place at its last draw only: every block is
    the projection of the scaled per-sample gradients, to the bit, however often its tensor is drawn."""
    model = TinyNet(seed=22)
    x, _ = _batch(n=6, seed=23)
    R = 40
    ext = GBCExtractor(model=model, cfg=FeatureConfig(kind="gbc", num_layers=R, proj_dim=3, projection=kind), seed=4,
                       chunk_bytes=1)  # one sample per chunk, as well as whole batches (below)
    ext.fit([(x, None)])
    names = ext.draws.names
    assert max(names.count(n) for n in names if math.prod(dict(model.named_parameters())[n].shape) > 3) >= 3
    proj = PROJECTIONS.get(kind)
    uniq = list(dict.fromkeys(names))
    for chunk_bytes, step in ((1, 1), (1 << 20, 6)):  # samples per chunk: the reference takes the same
        ext.chunk_bytes = chunk_bytes
        g = torch.from_numpy(ext.extract(x, None)["g"])
        for s in range(0, 6, step):
            grads = per_sample_grads(model, x[s:s + step], None, names=uniq, loss=label_free_loss)
            for r, name in enumerate(names):
                blk = grads[name].reshape(step, -1) * float(ext.draws.scale[r])
                if blk.shape[1] > 3:
                    blk = proj(blk, dim=3, seed=derive_seed(4, "gbc", "proj", r))
                want = torch.cat([blk, blk.new_zeros(step, 3 - blk.shape[1])], 1)
                assert torch.equal(g[s:s + step, r * 3:(r + 1) * 3], want), (chunk_bytes, s, r, name)


class TokenNet(nn.Module):
    """A ViT's token parameters: cls_token's gradient is a slice of pos_embed's (one storage)."""

    def __init__(self) -> None:
        super().__init__()
        g = torch_generator(0, "tokens")
        self.embed_, self.head = nn.Linear(4, 16), nn.Linear(16, 10)
        self.cls_token = nn.Parameter(torch.randn(1, 1, 16, generator=g))
        self.pos_embed = nn.Parameter(torch.randn(1, 9, 16, generator=g))
        for p in [*self.embed_.parameters(), *self.head.parameters()]:
            p.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), self.embed_(x)], 1) + self.pos_embed
        return self.head(torch.tanh(t).mean(1))


def test_gradients_sharing_storage_are_never_projected_in_place() -> None:
    """pos_embed drawn (last) before cls_token, whose per-sample gradient is a view of the same
    storage: signing pos_embed's block in place would change cls_token's (it did, by 0.025)."""
    model = TokenNet()
    x = torch.randn(4, 8, 4, generator=torch_generator(1, "tokens"))
    ext = GBCExtractor(model=model, cfg=FeatureConfig(kind="gbc", num_layers=3, proj_dim=32), seed=17)
    ext.fit([(x, None)])
    assert ext.draws.names == ("pos_embed", "pos_embed", "cls_token")
    grads = per_sample_grads(model, x, None, names=["pos_embed", "cls_token"], loss=label_free_loss)
    assert grads["pos_embed"].untyped_storage().data_ptr() == grads["cls_token"].untyped_storage().data_ptr()
    g = torch.from_numpy(ext.extract(x, None)["g"])
    for r, name in enumerate(ext.draws.names):
        blk = grads[name].reshape(4, -1) * float(ext.draws.scale[r])
        if blk.shape[1] > 32:
            blk = PROJECTIONS.get("countsketch")(blk, dim=32, seed=derive_seed(17, "gbc", "proj", r))
        assert torch.equal(g[:, r * 32:r * 32 + blk.shape[1]], blk), name


def test_more_configuration_errors() -> None:
    model = TinyNet(seed=22)
    with pytest.raises(ValueError, match="proj_dim"):
        GBCExtractor(model=model, cfg=FeatureConfig(kind="gbc", num_layers=2, proj_dim=0), seed=0)
    with pytest.raises(ValueError, match=">= 0"):
        draw_tensors(np.array([1.0, -0.5, 1.0]), num_draws=2, seed=0)
    x, _ = _batch(n=4, seed=23)
    ext = GBCExtractor(model=model, cfg=FeatureConfig(kind="gbc", num_layers=2), seed=0)
    ext.fit([(x, None)])
    with pytest.raises(ValueError, match="sample ids"):
        ext.rows(sample_id=np.arange(3), snapshot=0, epoch=0, x=x, y=None)


def test_dense_columns_refuse_rows_that_do_not_match_the_ids() -> None:
    from pivotal_ray.core.densetable import dense_columns

    with pytest.raises(ValueError, match="len\\(sample_id\\) = 3"):
        dense_columns(np.arange(3), 0, 0, np.zeros((2, 4)))
    with pytest.raises(ValueError, match="\\(n, W\\)"):
        dense_columns(np.arange(3), 0, 0, np.zeros(3))

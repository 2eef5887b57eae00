"""RBC factors (eqs. 11-12), factorised inner products, the extractor registry, snapshot choice.

References are computed independently: per-sample last-layer gradients by a loop of
``torch.autograd.grad`` and inner products by materialising G densely.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from pivotal_ray.config import FeatureConfig
from pivotal_ray.core.features import (
    EXTRACTORS,
    RBCExtractor,
    choose_snapshots,
    factor_inner,
    factor_sq_norms,
    rbc_factors,
)
from pivotal_ray.core.featuretable import FactorFeatures
from pivotal_ray.core.seeding import numpy_rng, torch_generator


class TinyNet(nn.Module):
    """Follows the model contract (embed + head) with BatchNorm and dropout, so eval mode matters."""

    def __init__(self, *, d_in: int = 5, d: int = 4, C: int = 3, seed: int = 0) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(d_in, 7), nn.BatchNorm1d(7), nn.Tanh(), nn.Dropout(0.5),
                                  nn.Linear(7, d), nn.Tanh())
        self.head = nn.Linear(d, C)
        g = torch_generator(seed, "tinynet")
        with torch.no_grad():  # re-draw everything from a local generator: no global RNG
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g))
            bn = self.body[1]
            bn.running_mean.copy_(torch.randn(7, generator=g))
            bn.running_var.copy_(torch.rand(7, generator=g) + 0.5)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(x))


def _batch(n: int = 9, d_in: int = 5, C: int = 3, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch_generator(seed, "batch")
    return torch.randn(n, d_in, generator=g), torch.randint(0, C, (n,), generator=g)


def _autograd_head_grads(model: TinyNet, x: torch.Tensor, y: torch.Tensor, *, label_aware: bool) -> torch.Tensor:
    """Per-sample d loss / d head.weight, one autograd call per sample: (n, C, d)."""
    model.eval()
    out = []
    for j in range(x.shape[0]):
        z = model(x[j:j + 1])  # (1, C)
        if label_aware:
            loss = F.cross_entropy(z, y[j:j + 1])
        else:  # label-free loss of the spec: sum_c stopgrad(p_c) z_c
            loss = (torch.softmax(z, dim=1).detach() * z).sum()
        (g,) = torch.autograd.grad(loss, model.head.weight)
        out.append(g)
    return torch.stack(out)


@pytest.mark.parametrize("label_aware", [True, False])
def test_factors_reproduce_autograd_last_layer_gradients(label_aware: bool) -> None:
    model = TinyNet()
    x, y = _batch()
    ref = _autograd_head_grads(model, x, y, label_aware=label_aware).double()  # (n, C, d)
    model.train()  # rbc_factors must switch to eval itself (BatchNorm running stats, no dropout)
    A, Xt = rbc_factors(model, x, y, label_aware=label_aware)  # (n, C), (n, d)
    assert model.training, "rbc_factors must restore the caller's mode"
    assert A.shape == (9, 3) and Xt.shape == (9, 4) and A.dtype == torch.float32
    A, Xt = A.double(), Xt.double()
    # Frobenius inner products <A_i x_i^T, A_j x_j^T> = (A_i . A_j)(x_i . x_j) vs autograd's
    gram_ref = torch.einsum("icd,jcd->ij", ref, ref)
    gram = (A @ A.T) * (Xt @ Xt.T)
    torch.testing.assert_close(gram, gram_ref, rtol=1e-5, atol=1e-6)
    # and the blocks themselves (stronger: the sign and layout of G_j = A_j x_j^T, eq. 11)
    torch.testing.assert_close(torch.einsum("nc,nd->ncd", A, Xt), ref, rtol=1e-5, atol=1e-6)


def test_label_aware_and_free_differ_by_the_onehot() -> None:
    model = TinyNet(seed=3)
    x, y = _batch(seed=4)
    A_free, X_free = rbc_factors(model, x, label_aware=False)
    A_aware, X_aware = rbc_factors(model, x, y.numpy(), label_aware=True)  # numpy labels accepted
    torch.testing.assert_close(X_free, X_aware)
    torch.testing.assert_close(A_free - A_aware, F.one_hot(y, 3).float())
    torch.testing.assert_close(A_free.sum(1), torch.ones(9))  # softmax rows


def test_rbc_factors_rejects_bad_input() -> None:
    model = TinyNet()
    x, y = _batch()
    with pytest.raises(ValueError, match="needs the labels"):
        rbc_factors(model, x, label_aware=True)
    with pytest.raises(ValueError, match=r"class indices in \[0, 3\)"):
        rbc_factors(model, x, y + 3, label_aware=True)
    with pytest.raises(ValueError, match="class indices"):
        rbc_factors(model, x, y[:4], label_aware=True)
    with pytest.raises(TypeError, match="model contract"):
        rbc_factors(nn.Linear(5, 3), x, label_aware=False)


def _random_factors(n: int, K: int, C: int, d: int, seed: int) -> FactorFeatures:
    rng = numpy_rng(seed, "factors")
    return FactorFeatures(np.arange(n, dtype=np.int64),
                          rng.standard_normal((n, K, C)).astype(np.float32),
                          rng.standard_normal((n, K, d)).astype(np.float32))


@settings(max_examples=25, deadline=None)
@given(n_a=st.integers(1, 6), n_b=st.integers(1, 6), K=st.integers(1, 3), C=st.integers(1, 4),
       d=st.integers(1, 5), seed=st.integers(0, 1000))
def test_factor_inner_and_norms_match_dense(n_a: int, n_b: int, K: int, C: int, d: int, seed: int) -> None:
    a = _random_factors(n_a, K, C, d, seed)
    b = _random_factors(n_b, K, C, d, seed + 1)
    # dense reference in float64 (the factors are float32; their outer products are formed in f64)
    Ga = FactorFeatures(a.sample_id, a.A.astype(np.float64), a.X.astype(np.float64)).dense()  # (n_a, K*C*d)
    Gb = FactorFeatures(b.sample_id, b.A.astype(np.float64), b.X.astype(np.float64)).dense()  # (n_b, K*C*d)
    np.testing.assert_allclose(factor_inner(a, b), Ga @ Gb.T, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(factor_sq_norms(a), (Ga ** 2).sum(1), rtol=1e-9, atol=1e-9)
    # the diagonal of the self inner products is the squared norm
    np.testing.assert_allclose(np.diag(factor_inner(a, a)), factor_sq_norms(a), rtol=1e-12)


def test_factor_inner_rejects_mismatched_shapes() -> None:
    with pytest.raises(ValueError, match="same snapshots"):
        factor_inner(_random_factors(3, 2, 3, 4, 0), _random_factors(3, 2, 3, 5, 0))


@pytest.mark.parametrize("label_aware", [True, False])
def test_rbc_extractor_from_registry(label_aware: bool) -> None:
    assert "rbc" in EXTRACTORS
    model = TinyNet(seed=5)
    x, y = _batch(n=6, seed=6)
    ext = EXTRACTORS.get("rbc")(model=model, cfg={"label_aware": label_aware}, seed=0)
    assert isinstance(ext, RBCExtractor) and not ext.needs_fit
    ids = np.array([10, 3, 7, 1, 2, 99], dtype=np.int64)
    rows = ext.rows(sample_id=ids, snapshot=2, epoch=41, x=x, y=y)
    A, Xt = rbc_factors(model, x, y, label_aware=label_aware)
    assert set(rows) == {"sample_id", "snapshot", "epoch", "A", "x"}
    np.testing.assert_array_equal(rows["sample_id"], ids)
    np.testing.assert_array_equal(rows["snapshot"], np.full(6, 2, np.int32))
    np.testing.assert_array_equal(rows["epoch"], np.full(6, 41, np.int32))
    np.testing.assert_array_equal(rows["A"], A.numpy())
    np.testing.assert_array_equal(rows["x"], Xt.numpy())
    with pytest.raises(ValueError, match="sample ids"):
        ext.rows(sample_id=ids[:2], snapshot=0, epoch=0, x=x, y=y)
    with pytest.raises(KeyError, match="choose one of"):
        EXTRACTORS.get("nope")
    with pytest.raises(ValueError):
        FeatureConfig(num_snapshots=0)


# ---------------------------------------------------------------------------------------------
# choose_snapshots
# ---------------------------------------------------------------------------------------------


def _accs(epochs, best: int) -> dict[int, float]:
    return {e: (0.9 if e == best else 0.5 - 1e-3 * e) for e in epochs}


def test_choose_snapshots_paper_stride() -> None:
    assert choose_snapshots(_accs(range(100), 10), num_snapshots=5, stride=20) == [10, 30, 50, 70, 90]
    assert choose_snapshots(_accs(range(100), 10), num_snapshots=1, stride=20) == [10]


def test_choose_snapshots_falls_back_to_the_largest_stride_that_fits() -> None:
    # 4 more picks after 10 within (10, 59]: stride 12 is the largest with 10 + 4 * s <= 59
    assert choose_snapshots(_accs(range(60), 10), num_snapshots=5, stride=20) == [10, 22, 34, 46, 58]
    # snapshot_every=2 grid and an odd stride: 15 would hit odd epochs, 14 is the largest even one
    assert choose_snapshots(_accs(range(0, 100, 2), 4), num_snapshots=4, stride=15) == [4, 18, 32, 46]


def test_choose_snapshots_with_too_few_or_irregular_epochs() -> None:
    assert choose_snapshots(_accs(range(13), 10), num_snapshots=5, stride=20) == [10, 11, 12]
    assert choose_snapshots(_accs(range(13), 12), num_snapshots=5, stride=20) == [12]  # best = last
    # irregular grid: no arithmetic progression fits, so positions q-1, 2q-1 with q = 5 // 2
    irregular = [0, 3, 4, 9, 17, 30, 32]  # no 3 + s, 3 + 2s pair exists for s <= 20
    assert choose_snapshots(_accs(irregular, 3), num_snapshots=3, stride=20) == [3, 9, 30]


def test_choose_snapshots_ties_pick_the_earliest_best() -> None:
    accs = {e: 0.5 for e in range(30)} | {7: 0.8, 12: 0.8}
    assert choose_snapshots(accs, num_snapshots=3, stride=5) == [7, 12, 17]


def test_choose_snapshots_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="run the warm-up"):
        choose_snapshots({}, num_snapshots=3, stride=2)
    with pytest.raises(ValueError, match="features.stride"):
        choose_snapshots({0: 0.1}, num_snapshots=3, stride=0)
    with pytest.raises(ValueError, match="not finite at epochs \\[2\\]"):
        choose_snapshots({0: 0.1, 2: float("nan")}, num_snapshots=3, stride=2)


@settings(max_examples=60, deadline=None)
@given(epochs=st.sets(st.integers(0, 80), min_size=1, max_size=40), K=st.integers(1, 6),
       stride=st.integers(1, 25), seed=st.integers(0, 10_000))
def test_choose_snapshots_properties(epochs: set[int], K: int, stride: int, seed: int) -> None:
    rng = numpy_rng(seed, "accs")
    accs = {e: float(rng.integers(0, 5)) / 4 for e in epochs}  # coarse values: ties happen
    out = choose_snapshots(accs, num_snapshots=K, stride=stride)
    t_star = min(e for e in epochs if accs[e] == max(accs.values()))
    later = sorted(e for e in epochs if e > t_star)
    assert out[0] == t_star
    assert out == sorted(set(out)) and set(out) <= epochs
    assert len(out) == min(K, 1 + len(later))
    # when the requested stride fits, it is used exactly
    if all(t_star + m * stride in epochs for m in range(1, K)):
        assert out == [t_star + m * stride for m in range(K)]


def test_a_rounds_feature_table_is_reused_only_for_the_same_snapshots_and_settings(tmp_path):
    """A round's table (features.json) is read back on resume only when it came from the same
    training run's snapshots with the same feature settings; after the meta labels change (a new
    warm-up run, same epochs) or a GBC knob changes, it is extracted again."""
    import json

    from pivotal_ray.distributed.extract import snapshot_records, table_settings
    from pivotal_ray.selectors import _table_is

    def snaps(run):
        return [{"path": str(tmp_path / run / f"checkpoint_00000{e}"), "epoch": e} for e in (3, 5)]

    def write(spec, run):
        (tmp_path / "t").mkdir(exist_ok=True)
        (tmp_path / "t" / "features.json").write_text(json.dumps(
            {**table_settings(spec), "snapshots": snapshot_records(snaps(run)), "num_samples": 10, "seed": 1}))

    rbc = {"kind": "rbc", "label_aware": False}
    gbc = {"kind": "gbc", "label_aware": False, "proj_dim": 256}
    same = dict(num_samples=10, seed=1)
    write(rbc, "warmup-a")
    assert _table_is(tmp_path / "t", snapshots=snaps("warmup-a"), feature_spec=rbc, **same)
    assert _table_is(tmp_path / "t", snapshots=snaps("warmup-a"), feature_spec={**rbc, "proj_dim": 64}, **same)
    assert not _table_is(tmp_path / "t", snapshots=snaps("warmup-b"), feature_spec=rbc, **same)  # another run
    assert not _table_is(tmp_path / "t", snapshots=snaps("warmup-a")[:1], feature_spec=rbc, **same)
    assert not _table_is(tmp_path / "t", snapshots=snaps("warmup-a"), feature_spec={**rbc, "label_aware": True},
                         **same)
    assert not _table_is(tmp_path / "t", snapshots=snaps("warmup-a"), feature_spec=gbc, **same)
    assert not _table_is(tmp_path / "t", snapshots=snaps("warmup-a"), feature_spec=rbc, num_samples=10, seed=2)
    assert not _table_is(tmp_path / "t", snapshots=snaps("warmup-a"), feature_spec=rbc, num_samples=11, seed=1)
    write(gbc, "warmup-a")
    assert _table_is(tmp_path / "t", snapshots=snaps("warmup-a"), feature_spec=gbc, **same)
    for change in ({"proj_dim": 512}, {"num_layers": 3}, {"projection": "gaussian"}):
        assert not _table_is(tmp_path / "t", snapshots=snaps("warmup-a"), feature_spec={**gbc, **change}, **same)


# ---------------------------------------------------------------------------------------------
# mutation audit: cases no earlier test pinned down
# ---------------------------------------------------------------------------------------------


def test_choose_snapshots_uses_stride_one_when_only_it_fits() -> None:
    # rule 2 goes down to s = 1: 11, 12 follow t* = 10 one apart, so they are picked before
    # falling back to positions (rule 3 would give later[1], later[3] = 12, 20)
    assert choose_snapshots(_accs([0, 5, 10, 11, 12, 13, 20], 10), num_snapshots=3, stride=20) == [10, 11, 12]


def test_rbc_factors_rejects_an_embedding_that_is_not_n_by_d() -> None:
    class Batched(TinyNet):
        def embed(self, x: torch.Tensor) -> torch.Tensor:
            return super().embed(x).unsqueeze(1)  # (n, 1, d): the head still applies, the contract does not

    x, _ = _batch()
    with pytest.raises(ValueError, match="contract is \\(n, d\\)"):
        rbc_factors(Batched(), x, label_aware=False)

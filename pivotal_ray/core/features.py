"""Per-sample features for the clustering (spec section 3; paper eqs. 11-12, Algorithm 3).

RBC keeps the last-layer gradient of sample j factorised, ``G_j = A_j x~_j^T`` (eq. 11), with
``x~_j = model.embed(x_j)`` (d,) the input of the last linear layer and (eq. 12)

- ``A_j = softmax(z_j)``                   label-free: noisy labels, the label part is unknowable
- ``A_j = softmax(z_j) - onehot(y_j)``     label-aware: class imbalance, labels are trusted

so ``G_j`` (C x d) is never formed; inner products and norms come from the factors
(:func:`factor_inner`, :func:`factor_sq_norms`).

Extractors are pluggable through :data:`EXTRACTORS` (name -> factory). A factory is called as
``EXTRACTORS.get(cfg.kind)(model=model, cfg=cfg, seed=seed)`` for ONE snapshot's model and returns
a :class:`FeatureExtractor`. The driver (``distributed/extract.py``) then

1. if ``extractor.needs_fit``: calls ``extractor.fit(batches)`` once with every candidate batch
   ``(x, y)`` (GBC estimates its per-tensor importances ``A^(l)`` here, eq. 14);
2. calls ``extractor.rows(sample_id=..., snapshot=k, epoch=..., x=..., y=...)`` per batch and
   writes the returned columns (one row per sample) to parquet.

Example::

    ext = EXTRACTORS.get("rbc")(model=model, cfg=FeatureConfig(), seed=0)
    cols = ext.extract(x, None)          # {"A": (n, C) float32, "x": (n, d) float32}
"""

from __future__ import annotations

import math
from typing import Iterable, Mapping, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..config import FeatureConfig, _build
from .featuretable import FactorFeatures, factor_columns
from .featuretable import read_factor_table as load_factor_table
from .registry import Registry

__all__ = [
    "EXTRACTORS",
    "FeatureExtractor",
    "RBCExtractor",
    "choose_snapshots",
    "clustering_kinds",
    "factor_inner",
    "factor_sq_norms",
    "load_factor_table",
    "rbc_factors",
]


# ---------------------------------------------------------------------------------------------
# RBC factors (eqs. 11-12)
# ---------------------------------------------------------------------------------------------


def _check_model(model: nn.Module) -> nn.Linear:
    head = getattr(model, "head", None)
    if not callable(getattr(model, "embed", None)) or not isinstance(head, nn.Linear):
        raise TypeError(f"{type(model).__name__} does not follow the model contract: it needs "
                        "embed(x) -> (n, d) and head: nn.Linear(d, C) (see pivotal_ray.core.models)")
    return head


@torch.no_grad()
def rbc_factors(model: nn.Module, x: torch.Tensor, y: torch.Tensor | np.ndarray | None = None, *,
                label_aware: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """RBC factors of the last-layer gradient ``G_j = A_j x~_j^T`` (eqs. 11-12).

    Runs in eval mode (restoring the model's mode afterwards) without autograd, so BatchNorm uses
    its running statistics and dropout is off, as in the snapshot being described.

    Parameters
    ----------
    model : nn.Module
        Follows the model contract: ``embed(x) -> (n, d)``, ``head: nn.Linear(d, C)``.
    x : Tensor (n, *input_shape)
        Inputs; moved to the head's device.
    y : Tensor or ndarray (n,) int, optional
        Labels, required when ``label_aware``; ignored otherwise.
    label_aware : bool
        ``A = p - onehot(y)`` (gradient of cross-entropy w.r.t. the logits) if True, else ``A = p``
        (the label-free part, eq. S6).

    Returns
    -------
    A : Tensor (n, C) float32
    Xt : Tensor (n, d) float32
        ``A[j] outer Xt[j]`` equals the per-sample gradient w.r.t. ``head.weight`` of cross-entropy
        (label-aware) or of ``sum_c stopgrad(p_c) z_c`` (label-free).
    """
    head = _check_model(model)
    if label_aware and y is None:
        raise ValueError("label_aware=True needs the labels y (n,): pass y, or use label_aware=False")
    device = head.weight.device
    was_training = model.training
    model.eval()
    try:
        xt = model.embed(x.to(device))  # (n, d)
        z = head(xt)  # (n, C)
    finally:
        model.train(was_training)
    if xt.ndim != 2 or xt.shape[0] != x.shape[0]:
        raise ValueError(f"model.embed returned shape {tuple(xt.shape)}; the contract is (n, d) with n={x.shape[0]}")
    A = torch.softmax(z.float(), dim=1)  # (n, C); the label-free part of dL/dz (eq. S6)
    if label_aware:
        y = torch.as_tensor(y, device=device).long()
        C = A.shape[1]
        if y.shape != (A.shape[0],) or (y.numel() and (int(y.min()) < 0 or int(y.max()) >= C)):
            raise ValueError(f"y must be (n,) = ({A.shape[0]},) class indices in [0, {C}); "
                             f"got shape {tuple(y.shape)}")
        A = A - F.one_hot(y, C).to(A.dtype)  # (n, C); eq. 12
    return A, xt.float()


# ---------------------------------------------------------------------------------------------
# Extractors (pluggable; GBC joins through the same registry)
# ---------------------------------------------------------------------------------------------


class FeatureExtractor(Protocol):
    """Per-sample features of ONE snapshot's model; built as ``factory(model=, cfg=, seed=)``."""

    needs_fit: bool  # True: call fit() with every candidate batch before extract()/rows()

    def fit(self, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """One pass over all candidates ``(x (n, ...), y (n,))`` (e.g. GBC's ``A^(l)``, eq. 14)."""
        ...

    def extract(self, x: torch.Tensor, y: torch.Tensor | None) -> dict[str, np.ndarray]:
        """Feature columns for a batch: name -> array with leading dim n."""
        ...

    def rows(self, *, sample_id: np.ndarray, snapshot: int, epoch: int, x: torch.Tensor,
             y: torch.Tensor | None) -> dict[str, np.ndarray]:
        """Table rows for a batch: ``sample_id``, ``snapshot``, ``epoch`` plus the feature columns."""
        ...


EXTRACTORS: Registry = Registry("feature extractor")


def clustering_kinds() -> list[str]:
    """The registered extractors whose rows the clustering takes (``features.kind``): every one
    but those marked ``clusterable = False`` (the ``predictions`` of core.baselines)."""
    return [n for n in EXTRACTORS.names() if getattr(EXTRACTORS.get(n), "clusterable", True)]


@EXTRACTORS.register("rbc")
class RBCExtractor:
    """RBC (eqs. 11-12): forward passes only; rows follow the factor table layout (featuretable)."""

    needs_fit = False

    def __init__(self, *, model: nn.Module, cfg: FeatureConfig | Mapping, seed: int) -> None:
        cfg = cfg if isinstance(cfg, FeatureConfig) else _build(FeatureConfig, cfg, "the feature config")
        _check_model(model)
        self.model = model
        self.label_aware = bool(cfg.label_aware)
        self.seed = int(seed)  # RBC is deterministic; kept for the common factory signature

    def fit(self, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Nothing to estimate: RBC needs no pass over the candidates."""

    def extract(self, x: torch.Tensor, y: torch.Tensor | None) -> dict[str, np.ndarray]:
        A, xt = rbc_factors(self.model, x, y, label_aware=self.label_aware)  # (n, C), (n, d)
        return {"A": A.cpu().numpy(), "x": xt.cpu().numpy()}

    def rows(self, *, sample_id: np.ndarray, snapshot: int, epoch: int, x: torch.Tensor,
             y: torch.Tensor | None) -> dict[str, np.ndarray]:
        cols = self.extract(x, y)
        if cols["A"].shape[0] != len(sample_id):
            raise ValueError(f"{len(sample_id)} sample ids for a batch of {cols['A'].shape[0]} inputs")
        return factor_columns(sample_id, snapshot, epoch, cols["A"], cols["x"])


# ---------------------------------------------------------------------------------------------
# Inner products and norms of factorised G (spec section 3)
# ---------------------------------------------------------------------------------------------


def factor_sq_norms(feats: FactorFeatures, *, dtype: np.dtype | type = np.float64) -> np.ndarray:
    """Squared Frobenius norms ``||G_j||^2 = sum_k ||A_jk||^2 ||x~_jk||^2`` without forming G.

    Parameters
    ----------
    feats : FactorFeatures
        A (n, K, C), X (n, K, d).
    dtype : numpy dtype
        Accumulation dtype (float64 by default so the K-block sums and rankings are stable).

    Returns
    -------
    ndarray (n,)
    """
    A = feats.A.astype(dtype, copy=False)  # (n, K, C)
    X = feats.X.astype(dtype, copy=False)  # (n, K, d)
    # ||a x^T||_F^2 = ||a||^2 ||x||^2 per block; blocks are orthogonal pieces of G_j, so they add
    return np.einsum("nkc,nkc,nkd,nkd->n", A, A, X, X, optimize=True)


def factor_inner(a: FactorFeatures, b: FactorFeatures, *,
                 dtype: np.dtype | type = np.float64) -> np.ndarray:
    """Frobenius inner products ``<G_i, G_j> = sum_k (A_ik . A_jk)(x~_ik . x~_jk)`` without G.

    Parameters
    ----------
    a : FactorFeatures
        A (n_a, K, C), X (n_a, K, d).
    b : FactorFeatures
        A (n_b, K, C), X (n_b, K, d): same K, C, d as ``a``.
    dtype : numpy dtype
        Accumulation dtype (float64 by default).

    Returns
    -------
    ndarray (n_a, n_b)
    """
    if a.A.shape[1:] != b.A.shape[1:] or a.X.shape[1:] != b.X.shape[1:]:
        raise ValueError(f"factor shapes differ: a has (K, C)={a.A.shape[1:]}, (K, d)={a.X.shape[1:]}; "
                         f"b has {b.A.shape[1:]}, {b.X.shape[1:]}: extract both at the same snapshots "
                         "with the same model")
    out = np.zeros((len(a), len(b)), dtype=dtype)  # (n_a, n_b)
    for k in range(a.num_snapshots):
        # <A_i x_i^T, A_j x_j^T>_F = (A_i . A_j)(x_i . x_j): two small GEMMs per block, no C*d tensor
        aa = a.A[:, k].astype(dtype, copy=False) @ b.A[:, k].astype(dtype, copy=False).T  # (n_a, n_b)
        xx = a.X[:, k].astype(dtype, copy=False) @ b.X[:, k].astype(dtype, copy=False).T  # (n_a, n_b)
        out += aa * xx
    return out


# ---------------------------------------------------------------------------------------------
# Which snapshots (spec 1.2a; paper Algorithm 3 and "Sampling model parameters from history")
# ---------------------------------------------------------------------------------------------


def choose_snapshots(val_acc_by_epoch: Mapping[int, float], *, num_snapshots: int,
                     stride: int) -> list[int]:
    """The K snapshot epochs: the best-validation epoch ``t*`` and then every ``stride`` epochs.

    Rules, in order:

    1. ``t*`` is the epoch with the highest validation accuracy (the earliest one on ties). It is
       always the first pick, so K counts ``t*`` itself (the spec's reading of step 2a).
    2. The remaining ``K - 1`` picks are ``t* + m s`` for ``m = 1..K-1`` with the LARGEST stride
       ``s <= stride`` for which all of them are existing epochs. ``s = stride`` is the spec's
       rule; a smaller one is used only when training ended too soon after ``t*`` (or the epoch
       grid of ``snapshot_every`` does not contain the multiples of ``stride``), because K
       snapshots spread as widely as the history allows estimate MCO better than fewer ones.
    3. If no such stride exists (fewer than K epochs after ``t*``, or an irregular grid), the
       epochs after ``t*`` are strided by position instead: with ``L`` of them and ``q = L // (K-1)``
       the picks are the ones at positions ``q-1, 2q-1, ...``; all of them when ``L < K - 1``.

    So the result has ``min(K, 1 + #epochs after t*)`` distinct, ascending, existing epochs.

    Parameters
    ----------
    val_acc_by_epoch : Mapping[int, float]
        Validation accuracy of every kept snapshot, keyed by epoch.
    num_snapshots : int
        K >= 1.
    stride : int
        Epochs between consecutive picks after ``t*`` (paper: 20), >= 1.

    Returns
    -------
    list[int]
        Ascending epochs, the first being ``t*``.
    """
    if num_snapshots < 1 or stride < 1:
        raise ValueError(f"num_snapshots={num_snapshots} and stride={stride} must both be >= 1 "
                         "(features.num_snapshots, features.stride)")
    if not val_acc_by_epoch:
        raise ValueError("no snapshots to choose from: run the warm-up training first")
    accs = {int(e): float(v) for e, v in val_acc_by_epoch.items()}
    bad = sorted(e for e, v in accs.items() if not math.isfinite(v))
    if bad:
        raise ValueError(f"validation accuracy is not finite at epochs {bad}: check metrics.json of those snapshots")
    epochs = sorted(accs)
    best = max(accs.values())
    t_star = next(e for e in epochs if accs[e] == best)  # earliest best
    later = [e for e in epochs if e > t_star]
    want = num_snapshots - 1
    if want == 0:
        return [t_star]
    have = set(later)
    for s in range(stride, 0, -1):  # rule 2: widest stride <= requested that yields K epochs
        picks = [t_star + m * s for m in range(1, want + 1)]
        if all(p in have for p in picks):
            return [t_star] + picks
    if len(later) <= want:  # rule 3
        return [t_star] + later
    q = len(later) // want
    return [t_star] + [later[m * q - 1] for m in range(1, want + 1)]

"""GBC: gradient-based clustering features (spec section 3; paper eqs. 13-14, Algorithm 3).

The full-gradient inner product splits over parameter tensors l (eq. 13),
``<g_i, g_j> = sum_l <g_i^(l), g_j^(l)>``, and eq. 14 rewrites it as an expectation over
``l ~ p_l = A^(l) / A`` with ``A^(l) = ||(1/N) sum_j grad_{theta^(l)} f_j||_F^2``:
``<g_i, g_j> = E_l[<g_i^(l), g_j^(l)> / p_l]``. Drawing R tensors ``l_1..l_R`` with replacement
(once per snapshot, shared by all samples) and using the blocks
``grad_{theta^(l_r)} f_j / sqrt(R p_{l_r})`` makes the inner product of the concatenations an
unbiased estimate of the full one (over the tensors with ``p_l > 0``, which is every tensor whose
mean gradient is not exactly zero).

Losses: label-free (noisy labels) ``f_j = sum_c stopgrad(p_jc) z_jc``, whose gradient
``sum_c p_jc grad z_jc`` is the label-free part of the cross-entropy gradient (eq. S15:
``grad CE_j = grad f_j - grad z_{j,y_j}``); label-aware (imbalance): cross-entropy.

Per-sample gradients of the drawn tensors come from ``vmap(grad(.))`` over
``functional_call`` (never one backward per sample), in eval mode (BatchNorm with running
statistics; train-mode BatchNorm cannot be vmapped). Blocks longer than ``proj_dim`` are
compressed by a seeded random projection S (k x P, k = proj_dim) with ``E[S^T S] = I``, so
``E[<S a, S b>] = <a, b>``; S is regenerated chunk by chunk from the seed on every call and never
stored. Kinds (:data:`PROJECTIONS`):

- ``countsketch`` (default): every coordinate goes to one seeded bucket with a seeded sign (the
  sparse JL transform with one non-zero per column; Weinberger et al. 2009, Kane & Nelson 2014).
  Cost O(n P) per block; variance ``(||a||^2 ||b||^2 + <a,b>^2 - 2 sum_i a_i^2 b_i^2) / k``,
  never more than the Gaussian's.
- ``gaussian``: dense ``N(0, 1/k)`` entries (classical JL, sub-Gaussian tails). Cost O(n P k):
  for LeNet's fc1 (P = 48000, k = 4096) that is 2e11 flop per 1024 samples, hours on a CPU for
  MNIST, hence not the default.

Each drawn block is zero-padded to ``B = min(max_l numel(theta^(l)), proj_dim)``, so every snapshot's
row has the same width ``W = R B`` (a fixed-size parquet column, see
:mod:`pivotal_ray.core.densetable`); zeros change no inner product or norm.

Determinism: the draws depend only on the seed and ``A^(l)``, accumulated in float64 from the
candidate batches in the given order. Ray Data actors each fit on the same candidates in the same
order with the same seed, so they draw the same tensors (on CPU bit for bit; a float difference
in ``A^(l)`` could only change a draw whose uniform falls within ~1e-7 of a CDF boundary).

Example::

    ext = EXTRACTORS.get("gbc")(model=model, cfg=FeatureConfig(kind="gbc", num_layers=5), seed=0)
    ext.fit([(x, y)])                  # eq. 14: A^(l) over all candidates, then the R draws
    ext.extract(x, y)["g"].shape       # (n, R * B)
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

from ..config import FeatureConfig, _build
from .densetable import dense_columns
from .features import EXTRACTORS
from .registry import Registry
from .seeding import derive_seed, numpy_rng

__all__ = [
    "GBCExtractor", "TensorDraws", "PROJECTIONS", "label_free_loss", "label_aware_loss", "trainable_tensors",
    "tensor_importance", "draw_tensors", "per_sample_grads", "countsketch", "gaussian_projection", "SketchCache",
]


# ---------------------------------------------------------------------------------------------
# Losses (eq. S15)
# ---------------------------------------------------------------------------------------------

Loss = Callable[[torch.Tensor, "torch.Tensor | None"], torch.Tensor]


def label_free_loss(z: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
    """``sum_c stopgrad(p_c) z_c`` per sample: logits (n, C) -> (n,); ``y`` is ignored.

    Its gradient is ``sum_c p_c grad z_c`` = the label-free part of the cross-entropy gradient
    (eq. S15), whose logit gradient is RBC's ``A = p`` (eq. 12).
    """
    return (torch.softmax(z, dim=-1).detach() * z).sum(-1)


def label_aware_loss(z: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
    """Cross-entropy with the observed label per sample: logits (n, C), y (n,) -> (n,)."""
    if y is None:
        raise ValueError("label_aware=True needs the labels y (n,): pass y, or use label_aware=False")
    return F.cross_entropy(z, y, reduction="none")


def trainable_tensors(model: nn.Module) -> list[str]:
    """Names of the parameter tensors l = 1..L (``named_parameters`` order, requires_grad only)."""
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    if not names:
        raise ValueError(f"{type(model).__name__} has no trainable parameters: GBC needs gradients "
                         "(unfreeze at least one tensor, or use features.kind=rbc)")
    return names


def _params_and_buffers(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    return ({n: p.detach() for n, p in model.named_parameters()},
            {n: b.detach() for n, b in model.named_buffers()})


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Eval mode inside the block (BatchNorm running statistics, no dropout), the caller's mode after."""
    was = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was)


# ---------------------------------------------------------------------------------------------
# Importance A^(l) and the draws (eq. 14)
# ---------------------------------------------------------------------------------------------


def tensor_importance(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor | None]], *,
                      loss: Loss, names: Sequence[str] | None = None) -> tuple[np.ndarray, int]:
    """``A^(l) = ||(1/N) sum_j grad_{theta^(l)} f_j||_F^2`` for every tensor l (eq. 14).

    One backward per batch of the summed loss; the per-tensor sums are accumulated in float64 in
    batch order and divided by N at the end. Eval mode.

    Parameters
    ----------
    model : nn.Module
    batches : iterable of (x (n, ...), y (n,) or None), every candidate once
    loss : per-sample loss ``(z (n, C), y) -> (n,)``
    names : the tensors (default :func:`trainable_tensors`)

    Returns
    -------
    importance : ndarray (L,) float64
    N : int, the number of samples seen
    """
    names = list(trainable_tensors(model) if names is None else names)
    params, buffers = _params_and_buffers(model)
    sums = [torch.zeros_like(params[n], dtype=torch.float64) for n in names]
    N = 0
    with _eval_mode(model):
        for x, y in batches:
            leaves = {n: params[n].clone().requires_grad_(True) for n in names}
            z = functional_call(model, ({**params, **leaves}, buffers), (x,))  # (n, C)
            total = loss(z, y).sum()  # sum_j f_j over the batch
            grads = torch.autograd.grad(total, [leaves[n] for n in names], allow_unused=True)
            for s, g in zip(sums, grads):
                if g is not None:  # unused tensor: zero gradient
                    s += g.double()
            N += int(x.shape[0])
    if N == 0:
        raise ValueError("fit got no batches: pass every candidate batch (x, y) once")
    imp = np.array([float((s / N).square().sum()) for s in sums], dtype=np.float64)
    return imp, N


@dataclass(frozen=True)
class TensorDraws:
    """R tensors drawn with replacement, shared by all samples of one snapshot.

    names (R,) in draw order; index (R,) into the tensor list; prob (R,) ``p_{l_r}``; numel (R,);
    importance (L,) the ``A^(l)`` they were drawn from; scale (R,) ``1 / sqrt(R p_{l_r})``.
    """

    names: tuple[str, ...]
    index: np.ndarray
    prob: np.ndarray
    numel: np.ndarray
    importance: np.ndarray

    @property
    def scale(self) -> np.ndarray:
        return 1.0 / np.sqrt(len(self.names) * self.prob)  # (R,) eq. 14 importance weights


def draw_tensors(importance: np.ndarray, *, num_draws: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """R indices drawn with replacement with ``p_l = A^(l) / A`` (eq. 14), by inverse CDF.

    Parameters
    ----------
    importance : (L,) non-negative, not all zero
    num_draws : R >= 1
    seed : the draws are a function of (seed, importance) only

    Returns
    -------
    index : (R,) int64, never a tensor with ``p_l = 0``
    p : (L,) float64 probabilities
    """
    imp = np.asarray(importance, dtype=np.float64)
    total = imp.sum()
    if num_draws < 1:
        raise ValueError(f"num_draws={num_draws} must be >= 1 (features.num_layers)")
    if imp.ndim != 1 or (imp < 0).any() or not np.isfinite(total) or total <= 0:
        raise ValueError(f"tensor importances must be finite, >= 0 and not all zero; got {imp}: the mean "
                         "gradient vanished (a degenerate snapshot?); check the model or use features.kind=rbc")
    p = imp / total
    cdf = np.cumsum(p)
    u = numpy_rng(seed, "gbc", "tensors").random(num_draws) * cdf[-1]  # (R,)
    # side="right": a zero-probability tensor has an empty CDF interval and is never drawn
    idx = np.minimum(np.searchsorted(cdf, u, side="right"), len(p) - 1)
    return idx.astype(np.int64), p


# ---------------------------------------------------------------------------------------------
# Per-sample gradients (batched) and the random projections
# ---------------------------------------------------------------------------------------------


def per_sample_grads(model: nn.Module, x: torch.Tensor, y: torch.Tensor | None, *, names: Sequence[str],
                     loss: Loss) -> dict[str, torch.Tensor]:
    """Per-sample gradients of the tensors ``names``: one vmap(grad) call, eval mode.

    Parameters
    ----------
    x : (n, ...) inputs; y : (n,) labels or None (label-free)
    names : tensors to differentiate (others are constants)

    Returns
    -------
    dict name -> (n, *param.shape)
    """
    params, buffers = _params_and_buffers(model)
    wrt = {n: params[n] for n in dict.fromkeys(names)}  # unique, in order
    const = {n: p for n, p in params.items() if n not in wrt}

    def f(w: dict[str, torch.Tensor], xi: torch.Tensor, yi: torch.Tensor | None) -> torch.Tensor:
        z = functional_call(model, ({**const, **w}, buffers), (xi.unsqueeze(0),))  # (1, C)
        return loss(z, None if yi is None else yi.unsqueeze(0)).sum()

    with _eval_mode(model):
        return vmap(grad(f), in_dims=(None, 0, None if y is None else 0))(wrt, x, y)


Projection = Callable[..., torch.Tensor]
PROJECTIONS: Registry[Projection] = Registry("random projection")


def _cpu_generator(seed: int, *names: object) -> torch.Generator:
    # generated on the CPU and moved: the same matrix whatever device the features are on
    g = torch.Generator(device="cpu")
    g.manual_seed(derive_seed(seed, *names))
    return g


_SKETCH_CHUNK = 1 << 16  # columns per generated piece; fixed, so S depends on (seed, P, k) only


@PROJECTIONS.register("countsketch")
def countsketch(g: torch.Tensor, *, dim: int, seed: int, scale: float = 1.0, overwrite: bool = False,
                cache: "SketchCache | dict | None" = None) -> torch.Tensor:
    """Sparse JL ``S (scale a)``: coordinate i is added to bucket h(i) with sign s(i) (both seeded).

    ``E[<S a, S b>] = <a, b>`` since ``E[s_i s_j 1{h_i = h_j}] = 1{i = j}``. g (n, P) -> (n, dim).
    ``scale`` goes into the signs (``+-scale``), so the block is read once, not scaled in a pass of
    its own first: the same floats as ``countsketch(g * scale)``, since ``g (+-c)`` is ``+-(g c)``.
    ``overwrite=True``: g is the caller's scratch (left holding the signed, scaled values), which
    spares a copy of the block as large as g; ignored where g is not contiguous (e.g. broadcast).
    ``cache``: a dict the caller keeps between calls (a :class:`SketchCache` per extractor), where
    the buckets and signs are kept once made, on g's device (12 bytes per column: int64 bucket,
    float32 sign): each is drawn on the CPU (the same S on every device), which for a large tensor
    and a few samples per call (a ResNet on a GPU) costs more than the projection itself.
    """
    n, P = g.shape
    in_place = overwrite and g.is_contiguous()
    out = torch.zeros(n, dim, dtype=g.dtype, device=g.device)
    for c, c0 in enumerate(range(0, P, _SKETCH_CHUNK)):
        w = min(_SKETCH_CHUNK, P - c0)
        key = ("countsketch", seed, c, w, dim, g.device, g.dtype)
        if cache is not None and key in cache:
            h, s = cache[key]
        else:
            gen = _cpu_generator(seed, "countsketch", c)
            h = torch.randint(0, dim, (w,), generator=gen).to(g.device)  # (w,) buckets (int64: int32 was 4x slower)
            s = (torch.randint(0, 2, (w,), generator=gen) * 2 - 1).to(g.device, g.dtype)  # (w,) signs
            if cache is not None:
                cache[key] = h, s  # a SketchCache keeps it only within its byte budget
        s = s if scale == 1.0 else s * scale
        piece = g[:, c0:c0 + w]
        out.index_add_(1, h, piece.mul_(s) if in_place else piece * s)
    return out


@PROJECTIONS.register("gaussian")
def gaussian_projection(g: torch.Tensor, *, dim: int, seed: int, scale: float = 1.0,
                        overwrite: bool = False, cache: "SketchCache | dict | None" = None) -> torch.Tensor:
    """Dense JL ``S (scale a)`` with ``S_ij ~ N(0, 1/dim)``, generated in column pieces. g (n, P) -> (n, dim).

    ``overwrite=True``: g may be scaled in place (see :func:`countsketch`). ``cache`` is not used:
    S has dim x P entries (0.8 GB for LeNet's fc1 at dim 4096), regenerated on every call.
    """
    if scale != 1.0:
        g = g.mul_(scale) if overwrite and g.is_contiguous() else g * scale
    n, P = g.shape
    cols = max(1, (1 << 24) // dim)  # 64 MiB of float32 per piece; depends on dim only
    out = torch.zeros(n, dim, dtype=g.dtype, device=g.device)
    for c, c0 in enumerate(range(0, P, cols)):
        w = min(cols, P - c0)
        S = torch.randn(dim, w, generator=_cpu_generator(seed, "gaussian", c)).to(g.device, g.dtype)
        out += g[:, c0:c0 + w] @ S.T / math.sqrt(dim)  # (n, w) @ (w, dim)
    return out


class SketchCache:
    """A projection cache (see :func:`countsketch`) that keeps entries up to ``limit`` bytes in all;
    beyond it an entry is not kept (made again on each call, as without a cache). The mapping
    operations the projections use (``in``, ``[]``, ``[] =``) and ``clear``; a plain object, so
    copies and pickles keep their accounting."""

    def __init__(self, limit: int) -> None:
        self.limit = int(limit)
        self.bytes = 0
        self._entries: dict = {}

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    def __getitem__(self, key: object) -> tuple[torch.Tensor, ...]:
        return self._entries[key]

    def __setitem__(self, key: object, value: tuple[torch.Tensor, ...]) -> None:
        size = sum(t.numel() * t.element_size() for t in value)
        if key not in self._entries and self.bytes + size <= self.limit:
            self._entries[key] = value
            self.bytes += size

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        self._entries.clear()
        self.bytes = 0


# ---------------------------------------------------------------------------------------------
# The extractor
# ---------------------------------------------------------------------------------------------

DEFAULT_PROJECTION = "countsketch"


@EXTRACTORS.register("gbc")
class GBCExtractor:
    """GBC (eqs. 13-14) for ONE snapshot: ``fit`` draws the R tensors, ``extract`` builds the rows.

    Parameters
    ----------
    model : nn.Module with logits ``model(x) -> (n, C)``
    cfg : FeatureConfig (or dict): ``label_aware``, ``num_layers`` (R), ``proj_dim`` (k)
    seed : the draws and projections are functions of it (``derive_seed`` inside)
    projection : a :data:`PROJECTIONS` name; default ``cfg.projection`` if the config has that
        field, else ``"countsketch"``
    chunk_bytes : bound on the per-sample gradients held at once (samples are chunked); the
        count-sketch's buckets and signs, kept between calls, take at most a quarter of it more
    """

    needs_fit = True

    def __init__(self, *, model: nn.Module, cfg: FeatureConfig | Mapping, seed: int,
                 projection: str | None = None, chunk_bytes: int = 256 * 2**20) -> None:
        cfg = cfg if isinstance(cfg, FeatureConfig) else _build(FeatureConfig, cfg, "the feature config")
        if cfg.num_layers < 1 or cfg.proj_dim < 1:
            raise ValueError(f"features.num_layers={cfg.num_layers} and features.proj_dim={cfg.proj_dim} "
                             "must both be >= 1 (paper: 5 tensors; proj_dim e.g. 4096)")
        self.model = model
        self.label_aware = bool(cfg.label_aware)
        self.loss: Loss = label_aware_loss if self.label_aware else label_free_loss
        self.num_draws = int(cfg.num_layers)
        self.proj_dim = int(cfg.proj_dim)
        self.projection = projection or getattr(cfg, "projection", DEFAULT_PROJECTION)
        self._project = PROJECTIONS.get(self.projection)  # KeyError listing the kinds
        self.seed = int(seed)
        self.chunk_bytes = int(chunk_bytes)
        self.names = trainable_tensors(model)
        numel = {n: p.numel() for n, p in model.named_parameters()}
        self._numel = np.array([numel[n] for n in self.names], dtype=np.int64)  # (L,)
        self.block = int(min(self._numel.max(), self.proj_dim))  # B: every block padded to it
        self.width = self.num_draws * self.block  # W = R B per snapshot row
        self.draws: TensorDraws | None = None
        # the projections' buckets and signs, made once per draw, within a quarter of chunk_bytes
        self._projection_cache = SketchCache(self.chunk_bytes // 4)

    def fit(self, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """``A^(l)`` over every candidate batch (eq. 14), then the R draws from the seed."""
        imp, _ = tensor_importance(self.model, ((x, y if self.label_aware else None) for x, y in batches),
                                   loss=self.loss, names=self.names)
        idx, p = draw_tensors(imp, num_draws=self.num_draws, seed=self.seed)
        self._projection_cache.clear()  # keyed by draw, and the draws may change
        self.draws = TensorDraws(tuple(self.names[i] for i in idx), idx, p[idx], self._numel[idx], imp)

    def extract(self, x: torch.Tensor, y: torch.Tensor | None) -> dict[str, np.ndarray]:
        """``{"g": (n, W) float32}``: block r = ``grad_{l_r} f_j / sqrt(R p_{l_r})`` (projected if
        longer than proj_dim) in columns ``[r B, r B + w_r)``, zeros elsewhere."""
        if self.draws is None:
            raise RuntimeError("GBCExtractor.extract before fit: call fit(batches) with every candidate batch "
                               "first (needs_fit=True)")
        if self.label_aware and y is None:
            raise ValueError("label_aware=True needs the labels y (n,): pass y, or use label_aware=False")
        d = self.draws
        n = int(x.shape[0])
        out = np.zeros((n, self.width), dtype=np.float32)  # (n, R B)
        uniq = list(dict.fromkeys(d.names))
        last_draw = {name: r for r, name in enumerate(d.names)}  # a tensor drawn twice: its last r
        per_sample = int(sum(self._numel[self.names.index(u)] for u in uniq)) + self.width
        step = max(1, self.chunk_bytes // (8 * per_sample))  # gradients + their float copies
        for s in range(0, n, step):
            xs = x[s:s + step]
            ys = None if not self.label_aware else torch.as_tensor(y[s:s + step], device=xs.device).long()
            grads = per_sample_grads(self.model, xs, ys, names=uniq, loss=self.loss)  # name -> (m, *shape)
            # autograd may hand two tensors views of one gradient (a slice or cat backward, e.g. a
            # ViT's cls_token and pos_embed): those are never written in place
            storages = [t.untyped_storage().data_ptr() for t in grads.values()]
            scratch = {u for u, t in grads.items() if storages.count(t.untyped_storage().data_ptr()) == 1}
            for r, name in enumerate(d.names):
                blk = grads[name].reshape(xs.shape[0], -1).float()  # (m, P_r)
                if blk.shape[1] > self.proj_dim:  # JL keeps inner products in expectation; scaled inside,
                    # on the gradients themselves at their tensor's last draw (no copy of the block)
                    blk = self._project(blk, dim=self.proj_dim, seed=derive_seed(self.seed, "gbc", "proj", r),
                                        scale=float(d.scale[r]), overwrite=r == last_draw[name] and name in scratch,
                                        cache=self._projection_cache)
                else:
                    blk = blk * float(d.scale[r])
                out[s:s + xs.shape[0], r * self.block:r * self.block + blk.shape[1]] = blk.detach().cpu().numpy()
        return {"g": out}

    def rows(self, *, sample_id: np.ndarray, snapshot: int, epoch: int, x: torch.Tensor,
             y: torch.Tensor | None) -> dict[str, np.ndarray]:
        """Dense-table rows (densetable layout): sample_id, snapshot, epoch, g (n, W)."""
        g = self.extract(x, y)["g"]
        if g.shape[0] != len(sample_id):
            raise ValueError(f"{len(sample_id)} sample ids for a batch of {g.shape[0]} inputs")
        return dense_columns(sample_id, snapshot, epoch, g)

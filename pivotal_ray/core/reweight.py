"""Meta re-weighting steps (spec section 2; paper eqs. 2-4 and S4).

The default ``direct`` mode keeps a weight ``w_j`` in [0, 1] for every training sample and, for
each train batch ``B`` (global size ``|B|``) and meta batch ``B_m``:

1. ``g = grad_theta (1/|B|) sum_j w_j f_j(theta)``                       (all-reduced over workers)
2. virtual step ``theta_hat = theta - a g``
3. ``v = grad_theta mean_i f_meta_i(theta_hat)``                         (all-reduced over workers)
4. ``dL/dw_j = -(a/|B|) <v, grad_theta f_j(theta)>``  (eq. S4) -- all |B| inner products come from
   ONE forward-mode Jacobian-vector product of the per-sample losses at theta in direction v
   (forward-mode AD), so no second-order backward graph is ever built
5. ``w_j <- clip(w_j - eta dL/dw_j, 0, 1)``
6. the real step: ``grad_theta (1/|B|) sum_j w'_j f_j(theta)`` through the optimizer.

Steps 1 and 6 share one forward graph (two backward passes over it). BatchNorm running statistics
are updated by the real forward only: the virtual/meta and JVP passes run on copies of the buffers.

Data parallel: each worker passes its own slice of the global batch and a ``Reducer`` that sums
over workers; the result equals the single-process algorithm on the union batch for a model
without BatchNorm. With BatchNorm each worker normalises its slice by that slice's statistics
and updates its own running statistics (as DDP without SyncBatchNorm), so W workers are close
to, not equal to, one process; :func:`average_buffers_` makes the running statistics agree
across workers before a model is evaluated or saved.

Modes (``REWEIGHTERS``): ``direct`` (above), ``l2rw`` (Ren et al. 2018), ``mwnet`` (Shu et al.
2019, :mod:`pivotal_ray.core.mwnet`) and ``none`` (plain training with fixed weights, no meta
pass). A mode with ``needs_meta = False`` is stepped with ``x_meta = y_meta = None``. In ``l2rw``
the meta gradient is taken at ``theta`` itself, before the train batch is seen, so for a model
without normalisation layers the real forward and the JVP are one dual-tensor pass
(:func:`losses_and_grad_dots`, the same floats for a forward without dropout); ``direct`` and
``mwnet`` need the batch's gradient before ``v`` and keep the separate JVP.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn
import torch.autograd.forward_ad as fwAD
from torch.func import functional_call

from .registry import Registry


class Reducer(Protocol):
    """Collective ops across data-parallel workers (identity in one process)."""

    world_size: int

    def sum_(self, flat: torch.Tensor) -> torch.Tensor: ...

    def gather(self, t: torch.Tensor, sizes: list[int]) -> torch.Tensor: ...


class LocalReducer:
    world_size = 1

    def sum_(self, flat: torch.Tensor) -> torch.Tensor:
        return flat

    def gather(self, t: torch.Tensor, sizes: list[int]) -> torch.Tensor:
        return t


class TorchDistReducer:
    """Reducer over the default ``torch.distributed`` process group (gloo on CPU, NCCL on GPU)."""

    def __init__(self) -> None:
        import torch.distributed as dist

        self._dist = dist
        self.world_size = dist.get_world_size()

    def sum_(self, flat: torch.Tensor) -> torch.Tensor:
        self._dist.all_reduce(flat, op=self._dist.ReduceOp.SUM)
        return flat

    def gather(self, t: torch.Tensor, sizes: list[int]) -> torch.Tensor:
        """Concatenate every rank's ``t`` (rank r holds ``sizes[r]`` rows) in rank order."""
        width = max(sizes)
        padded = torch.zeros((width, *t.shape[1:]), dtype=t.dtype, device=t.device)
        padded[: t.shape[0]] = t
        out = [torch.empty_like(padded) for _ in sizes]
        self._dist.all_gather(out, padded)
        return torch.cat([o[:s] for o, s in zip(out, sizes)])


@dataclass
class StepOutput:
    loss: float  # (1/|B|) sum_j w'_j f_j on this worker's slice (sum over workers = global loss)
    meta_loss: float  # mean meta loss at theta_hat
    weights: torch.Tensor  # (b,) updated weights of this worker's samples
    weight_grad: torch.Tensor  # (b,) dL_meta/dw_j


def _flat(tensors: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


def _unflat(flat: torch.Tensor, like: list[torch.Tensor]) -> list[torch.Tensor]:
    out, i = [], 0
    for t in like:
        out.append(flat[i : i + t.numel()].view_as(t))
        i += t.numel()
    return out


def average_buffers_(model: nn.Module, reducer: Reducer) -> None:
    """Replace every floating-point buffer (BatchNorm running mean/var) by its mean over workers.

    Parameters agree across workers after every step, but running statistics are updated from
    each worker's own slice; averaging them makes every worker hold the same model, so the
    accuracy summed over workers' evaluation shards is the accuracy of the model rank 0 saves.
    Integer buffers (``num_batches_tracked``) already agree. No-op in one process.
    """
    bufs = [b for b in model.buffers() if b.is_floating_point()]
    if reducer.world_size == 1 or not bufs:
        return
    flat = reducer.sum_(_flat([b.detach() for b in bufs]).double()) / reducer.world_size
    with torch.no_grad():
        for b, v in zip(bufs, _unflat(flat, bufs)):
            b.copy_(v)


def _buffer_copies(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: b.detach().clone() for k, b in model.named_buffers()}


def meta_loss_fn(logits: torch.Tensor, y_meta: torch.Tensor, class_balanced: bool = False) -> torch.Tensor:
    """Mean cross-entropy of the meta batch; ``class_balanced``: the mean over the classes present
    of each class's mean loss (each meta sample weighted by 1 / its class's count)."""
    losses = F.cross_entropy(logits, y_meta, reduction="none")
    if not class_balanced:
        return losses.mean()
    inv = 1.0 / torch.bincount(y_meta, minlength=logits.shape[1]).to(losses.dtype)[y_meta]
    return (inv * losses).sum() / inv.sum()


def meta_gradient(model: nn.Module, params_hat: dict[str, torch.Tensor], x_meta: torch.Tensor,
                  y_meta: torch.Tensor, *, reducer: Reducer, class_balanced: bool = False) -> tuple[torch.Tensor, float]:
    """v = grad L_meta(theta_hat), averaged over workers (the meta batch is replicated).

    ``L_meta`` is the meta batch's mean loss, or its class-balanced mean (:func:`meta_loss_fn`).
    Returns the flat v (P,) and the meta loss.
    """
    names = list(params_hat)
    leaves = {k: p.detach().requires_grad_(True) for k, p in params_hat.items()}
    logits = functional_call(model, (leaves, _buffer_copies(model)), (x_meta,))  # (m, C)
    meta_loss = meta_loss_fn(logits, y_meta, class_balanced)
    v = _flat(list(torch.autograd.grad(meta_loss, [leaves[k] for k in names])))
    v = reducer.sum_(v) / reducer.world_size
    return v, float(meta_loss.detach())


_FORWARD_AD_LOCK = threading.Lock()


def per_sample_grad_dot(model: nn.Module, params: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor,
                        v: list[torch.Tensor]) -> torch.Tensor:
    """(b,) inner products <v, grad_theta f_j(theta)> from one forward-mode JVP (eq. S4).

    Dual tensors (``torch.autograd.forward_ad``) rather than ``torch.func.jvp``: BatchNorm's
    in-place update of its (copied) running statistics is legal here and forbidden under a
    functorch transform.
    """
    detached = {k: p.detach() for k, p in params.items()}
    return _dual_losses(model, detached, _buffer_copies(model), x, y, v)[1]


def _dual_losses(model: nn.Module, params: dict[str, torch.Tensor], buffers: dict[str, torch.Tensor],
                 x: torch.Tensor, y: torch.Tensor, v: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(primal, tangent) of the (b,) per-sample losses for parameters ``params`` (dual, tangents
    ``v``) and ``buffers``: one forward-mode pass of eq. S4."""
    with _FORWARD_AD_LOCK, fwAD.dual_level():  # dual levels are process-global: one thread at a time
        duals = {k: fwAD.make_dual(p, t) for (k, p), t in zip(params.items(), v)}
        logits = functional_call(model, (duals, buffers), (x,))  # (b, C)
        return tuple(fwAD.unpack_dual(F.cross_entropy(logits, y, reduction="none")))


def losses_and_grad_dots(model: nn.Module, params: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor,
                         v: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The real forward and :func:`per_sample_grad_dot` in one pass, for a ``v`` known beforehand.

    Returns the (b,) per-sample losses, with their autograd graph to ``params`` (the real step's
    backward runs on it), and the (b,) inner products ``<v, grad_theta f_j(theta)>``, detached.
    The parameters enter as dual tensors whose primal is the parameter itself, so the primal
    losses are those of ``model(x)``, computed by the same kernels (equal to the separate
    forward and JVP bit for bit), and one forward is saved. BatchNorm updates the model's own
    running statistics, as the real forward does. Bit for bit holds for a forward that draws no
    random numbers (none of this package's models does): with dropout, one pass takes the JVP
    through the real forward's masks, where a separate JVP draws masks of its own.

    The autograd graph also records the tangent's operations (they involve the parameters). For
    convolutions and linear layers that costs less memory than the separate JVP's peak; through
    normalisation layers, whose forward-mode formulas keep many intermediates, the step's peak
    about doubles (LeNet-5 and the CIFAR ResNet-18 in ``benchmarks.reweight_step``, docs/performance.md
    row 1). :class:`L2RWReweighter` therefore takes this path only for models without them.
    """
    losses, dots = _dual_losses(model, params, dict(model.named_buffers()), x, y, v)
    return losses, dots.detach()


# _NormBase: BatchNorm and InstanceNorm
_NORMALISATION = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, nn.RMSNorm, nn.LocalResponseNorm)


def has_normalisation(model: nn.Module) -> bool:
    """Whether ``model`` has a BatchNorm, InstanceNorm, GroupNorm, LayerNorm, RMSNorm or
    LocalResponseNorm layer."""
    return any(isinstance(m, _NORMALISATION) for m in model.modules())


REWEIGHTERS: Registry[type] = Registry("re-weighting mode")


class _Stateless:
    """Modes whose only state is the per-sample weight vector the train loop already keeps."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


@REWEIGHTERS.register("direct")
class DirectReweighter(_Stateless):
    """Per-sample weights updated by the exact meta gradient (spec section 2, 'direct')."""

    def __init__(self, *, meta_lr: float, meta_class_balanced: bool = False, **_: object) -> None:
        self.meta_lr = meta_lr
        self.meta_class_balanced = meta_class_balanced

    def step(self, *, model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
             w: torch.Tensor, x_meta: torch.Tensor, y_meta: torch.Tensor, lr: float, global_batch: int,
             reducer: Reducer) -> StepOutput:
        """One meta re-weighting step on this worker's slice (x (b, ...), y (b,), w (b,))."""
        named = [(k, p) for k, p in model.named_parameters() if p.requires_grad]
        names, params = [k for k, _ in named], [p for _, p in named]

        # (1) the real forward; its graph serves both backward passes (g and the real step)
        losses = F.cross_entropy(model(x), y, reduction="none")  # (b,)
        g = _flat(list(torch.autograd.grad((w * losses).sum() / global_batch, params, retain_graph=True)))
        g = reducer.sum_(g)  # (P,) = (1/|B|) sum over the global batch

        # (2-3) virtual step and meta gradient at theta_hat
        with torch.no_grad():
            theta_hat = {k: p - lr * gk for k, p, gk in zip(names, params, _unflat(g, params))}
        v, meta_loss = meta_gradient(model, theta_hat, x_meta, y_meta, reducer=reducer,
                                     class_balanced=self.meta_class_balanced)

        # (4) eq. S4 via one JVP; (5) projected gradient step on the weights
        dots = per_sample_grad_dot(model, dict(named), x, y, _unflat(v, params))  # (b,)
        weight_grad = -(lr / global_batch) * dots
        new_w = (w - self.meta_lr * weight_grad).clamp_(0.0, 1.0)

        # (6) the real step with the new weights, on the retained graph
        loss = (new_w * losses).sum() / global_batch
        _apply_step(loss, params, optimizer, reducer)
        return StepOutput(loss=float(loss.detach()), meta_loss=meta_loss, weights=new_w.detach(),
                          weight_grad=weight_grad.detach())


@REWEIGHTERS.register("l2rw")
class L2RWReweighter(_Stateless):
    """Learning to Reweight (Ren et al. 2018; the paper's eqs. S9-S12).

    At ``eps = 0`` the virtual step is the identity, so ``-dL_meta/d eps_j = a <v, grad f_j>``
    with ``v = grad L_meta(theta)``; weights are ``max(., 0)`` normalised to sum 1 over the
    global batch (all zero when every entry is clipped). No weight persists across steps; the
    returned weights are rescaled by ``|B|`` (mean 1) so they are comparable across batches.
    """

    def __init__(self, *, meta_class_balanced: bool = False, one_pass: bool | None = None, **_: object) -> None:
        self.meta_class_balanced = meta_class_balanced
        # None: one pass (:func:`losses_and_grad_dots`) unless the model has normalisation layers,
        # where it keeps about twice the activations; True / False force it (benchmarks, tests)
        self.one_pass = one_pass

    def step(self, *, model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
             w: torch.Tensor, x_meta: torch.Tensor, y_meta: torch.Tensor, lr: float, global_batch: int,
             reducer: Reducer) -> StepOutput:
        named = [(k, p) for k, p in model.named_parameters() if p.requires_grad]
        params = [p for _, p in named]
        one_pass = not has_normalisation(model) if self.one_pass is None else self.one_pass
        if not one_pass:
            losses = F.cross_entropy(model(x), y, reduction="none")  # (b,) the real forward
        v, meta_loss = meta_gradient(model, {k: p.detach() for k, p in named}, x_meta, y_meta, reducer=reducer,
                                     class_balanced=self.meta_class_balanced)
        if one_pass:  # v does not depend on the train batch: the real forward and the JVP in one pass
            losses, dots = losses_and_grad_dots(model, dict(named), x, y, _unflat(v, params))
        else:
            dots = per_sample_grad_dot(model, dict(named), x, y, _unflat(v, params))  # (b,) <v, grad f_j>
        weight_grad = -lr * dots  # dL_meta/d eps_j at eps = 0 (eq. S10)
        raw = (-weight_grad).clamp(min=0.0)  # (b,)
        total = reducer.sum_(raw.sum().reshape(1).to(torch.float64))[0]
        new_w = raw / total if total > 0 else torch.zeros_like(raw)  # eq. S11: sum over the global batch = 1
        loss = (new_w * losses).sum()
        _apply_step(loss, params, optimizer, reducer)
        return StepOutput(loss=float(loss.detach()), meta_loss=meta_loss,
                          weights=(new_w * global_batch).detach().to(w.dtype), weight_grad=weight_grad.detach())


@REWEIGHTERS.register("none")
class NoReweighter(_Stateless):
    """Plain training (the ``base`` method and fine-tuning): fixed weights, no meta pass.

    The real step is SGD on ``(1/|B|) sum_j w_j f_j`` with the weights as given (1 for every
    sample unless ``reweight.init_weight`` says otherwise); the meta batch is never touched.
    """

    needs_meta = False

    def __init__(self, **_: object) -> None:
        pass

    def step(self, *, model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
             w: torch.Tensor, x_meta: torch.Tensor | None, y_meta: torch.Tensor | None, lr: float,
             global_batch: int, reducer: Reducer) -> StepOutput:
        params = [p for p in model.parameters() if p.requires_grad]
        losses = F.cross_entropy(model(x), y, reduction="none")  # (b,)
        loss = (w.to(losses.dtype) * losses).sum() / global_batch
        _apply_step(loss, params, optimizer, reducer)
        return StepOutput(loss=float(loss.detach()), meta_loss=float("nan"), weights=w.detach(),
                          weight_grad=torch.zeros_like(w))


def _apply_step(loss: torch.Tensor, params: list[torch.Tensor], optimizer: torch.optim.Optimizer,
                reducer: Reducer) -> None:
    """The real step: gradients of this worker's share of the loss, summed over workers."""
    grads = reducer.sum_(_flat(list(torch.autograd.grad(loss, params))))
    for p, gp in zip(params, _unflat(grads, params)):
        p.grad = gp.clone()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def build_reweighter(mode: str, **kwargs: object):
    return REWEIGHTERS.get(mode)(**kwargs)


from . import mwnet as _mwnet  # noqa: E402,F401  registers "mwnet" (it builds on the helpers above)

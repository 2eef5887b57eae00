"""Meta-Weight-Net re-weighting (Shu et al. 2019; spec section 2, mode ``mwnet``).

A 1-100-1 MLP ``V(.; phi)`` (ReLU hidden layer, sigmoid output) maps each sample's loss to its
weight. For a train batch ``B`` and a meta batch ``B_m``, with learning rate ``a``:

1. ``w_j = V(f_j(theta); phi)`` (the loss enters as a number: no gradient flows into it),
   normalised over the global batch as in MW-Net: ``w~_j = w_j / sum_B w`` when the sum is
   non-zero, else ``w~_j = w_j``;
2. virtual step ``theta_hat(phi) = theta - a grad_theta sum_j w~_j f_j(theta)``;
3. ``v = grad_theta mean_i f_meta_i(theta_hat)``; by the chain rule
   ``dL_meta/dw~_j = -a <v, grad_theta f_j(theta)>``, all |B| inner products from one forward-mode
   JVP (as in the ``direct`` mode, eq. S4), then through ``w~ = w(phi) / S(phi)`` to phi:
   ``dL_meta/dphi = sum_j (c_j / S - T / S^2) dw_j/dphi`` with ``c_j = dL_meta/dw~_j``,
   ``S = sum_j w_j`` and ``T = sum_j c_j w_j``;
4. ``phi <- optimizer step on dL_meta/dphi`` (Adam or SGD, learning rate ``reweight.meta_lr``);
5. the real step on ``sum_j w~'_j f_j(theta)`` with the updated net's normalised weights.

Data parallel: ``S``, ``T``, ``g`` and the real-step gradient are sums over workers, and each
worker's ``dL/dphi`` is its samples' share of the sum above, so the all-reduce SUMS the shares:
the result is the single-process gradient on the union batch (averaging would divide it by the
number of workers). Every worker then takes the same optimizer step and keeps the same net.

BatchNorm running statistics are updated by the real forward only (the meta and JVP passes run on
buffer copies, see :mod:`pivotal_ray.core.reweight`).
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .reweight import (REWEIGHTERS, Reducer, StepOutput, _apply_step, _flat, _unflat, meta_gradient,
                       per_sample_grad_dot)
from .seeding import torch_generator

META_OPTIMIZERS: dict[str, Callable[..., torch.optim.Optimizer]] = {
    "adam": torch.optim.Adam,  # MW-Net's choice (lr 1e-3, weight decay 1e-4)
    "sgd": torch.optim.SGD,
}


class MetaWeightNet(nn.Module):
    """``V(loss; phi)``: (n,) losses -> (n,) weights in (0, 1); a 1-hidden-1 MLP.

    Parameters
    ----------
    hidden : int
        Width of the hidden layer (MW-Net: 100).
    generator : torch.Generator
        Seeds the initial parameters (uniform in +-1/sqrt(fan_in), PyTorch's Linear default range).
    """

    def __init__(self, *, hidden: int = 100, generator: torch.Generator) -> None:
        super().__init__()
        if hidden < 1:
            raise ValueError(f"hidden={hidden} must be >= 1 (MW-Net uses 100)")
        with torch.random.fork_rng(devices=[]):  # Linear's own init draws from the global RNG: keep it out
            self.fc1 = nn.Linear(1, hidden)
            self.fc2 = nn.Linear(hidden, 1)
        with torch.no_grad():
            for layer in (self.fc1, self.fc2):
                bound = 1.0 / math.sqrt(layer.in_features)
                for p in (layer.weight, layer.bias):
                    p.copy_(torch.rand(p.shape, generator=generator) * 2 * bound - bound)

    def forward(self, loss: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.fc1(loss.unsqueeze(1)))  # (n, hidden)
        return torch.sigmoid(self.fc2(h)).squeeze(1)  # (n,)


def _global_sum(t: torch.Tensor, reducer: Reducer) -> torch.Tensor:
    return reducer.sum_(t.sum().reshape(1).clone())[0]


def _normalise(w: torch.Tensor, total: torch.Tensor) -> torch.Tensor:
    """MW-Net's normalisation: divide by the batch sum when it is non-zero."""
    return w / total if float(total) != 0.0 else w


@REWEIGHTERS.register("mwnet")
class MWNetReweighter:
    """Weights from a meta-learned loss -> weight MLP (module docstring for the update).

    Parameters
    ----------
    meta_lr : float
        Learning rate of the net's optimizer (MW-Net: 1e-3 with Adam).
    seed : int
        The net's initial parameters derive from it (the same net on every worker).
    hidden : int, default 100
    optimizer : {"adam", "sgd"}, default "adam"
    weight_decay : float, default 1e-4
        Of the net's optimizer (MW-Net's value).
    """

    def __init__(self, *, meta_lr: float, seed: int = 0, hidden: int = 100, optimizer: str = "adam",
                 weight_decay: float = 1e-4, meta_class_balanced: bool = False, **_: object) -> None:
        if optimizer not in META_OPTIMIZERS:
            raise KeyError(f"unknown meta-weight-net optimizer {optimizer!r}: choose one of {sorted(META_OPTIMIZERS)}")
        self.net = MetaWeightNet(hidden=hidden, generator=torch_generator(seed, "mwnet"))
        self.opt = META_OPTIMIZERS[optimizer](self.net.parameters(), lr=meta_lr, weight_decay=weight_decay)
        self.meta_class_balanced = meta_class_balanced

    def state_dict(self) -> dict:
        return {"net": self.net.state_dict(), "optimizer": self.opt.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.net.load_state_dict(state["net"])
        self.opt.load_state_dict(state["optimizer"])

    def weights(self, losses: torch.Tensor) -> torch.Tensor:
        """(n,) un-normalised weights in [0, 1] of samples with these (n,) losses."""
        with torch.no_grad():
            return self.net(losses.detach().to(self._dtype()))

    def _dtype(self) -> torch.dtype:
        return next(self.net.parameters()).dtype

    def _match(self, like: torch.Tensor) -> None:
        # Module.to keeps the Parameter objects, so the optimizer still holds them; its state
        # (Adam's moments, e.g. just restored from a checkpoint onto the CPU in float32) is cast
        # to the parameters' new device and dtype by a round trip through load_state_dict, which
        # treats each optimizer's own entries (Adam's step count) as torch does
        p = next(self.net.parameters())
        if p.device != like.device or p.dtype != like.dtype:
            self.net.to(device=like.device, dtype=like.dtype)
            if self.opt.state:
                self.opt.load_state_dict(self.opt.state_dict())

    def step(self, *, model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
             w: torch.Tensor, x_meta: torch.Tensor, y_meta: torch.Tensor, lr: float, global_batch: int,
             reducer: Reducer) -> StepOutput:
        """One MW-Net step on this worker's slice (x (b, ...), y (b,)); ``w`` is ignored (weights
        come from the net) and the returned weights are the updated net's ``V(f_j)`` in [0, 1]."""
        named = [(k, p) for k, p in model.named_parameters() if p.requires_grad]
        names, params = [k for k, _ in named], [p for _, p in named]
        losses = F.cross_entropy(model(x), y, reduction="none")  # (b,) the real forward
        self._match(losses)
        phi = list(self.net.parameters())

        # (1-2) virtual step with the current net's normalised weights
        w_cur = self.weights(losses)  # (b,)
        S = _global_sum(w_cur, reducer)
        g = _flat(list(torch.autograd.grad((_normalise(w_cur, S) * losses).sum(), params, retain_graph=True)))
        g = reducer.sum_(g)  # (P,)
        with torch.no_grad():
            theta_hat = {k: p - lr * gk for k, p, gk in zip(names, params, _unflat(g, params))}

        # (3) v at theta_hat; c_j = dL_meta/dw~_j = -a <v, grad f_j> from one JVP
        v, meta_loss = meta_gradient(model, theta_hat, x_meta, y_meta, reducer=reducer,
                                     class_balanced=self.meta_class_balanced)
        c = -lr * per_sample_grad_dot(model, dict(named), x, y, _unflat(v, params))  # (b,)
        if float(S) != 0.0:
            T = _global_sum(c * w_cur, reducer)
            coef = c / S - T / S**2  # d(sum_j c_j w_j / S)/dw_j, S and T over the global batch
        else:
            coef = c
        # (4) this worker's share of dL_meta/dphi, summed over workers; the net's optimizer step
        w_phi = self.net(losses.detach())  # (b,) with a graph to phi
        phi_grad = reducer.sum_(_flat(list(torch.autograd.grad((coef.detach() * w_phi).sum(), phi))))
        for p, gp in zip(phi, _unflat(phi_grad, phi)):
            p.grad = gp.clone()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)

        # (5) the real step with the updated net's normalised weights
        w_new = self.weights(losses)  # (b,) in [0, 1]
        loss = (_normalise(w_new, _global_sum(w_new, reducer)) * losses).sum()
        _apply_step(loss, params, optimizer, reducer)
        return StepOutput(loss=float(loss.detach()), meta_loss=meta_loss, weights=w_new.to(w.dtype),
                          weight_grad=c.detach())

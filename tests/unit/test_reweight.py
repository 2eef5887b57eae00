"""The direct meta re-weighting step against autograd through the virtual step (eq. S4)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from pivotal_ray.core.reweight import DirectReweighter, LocalReducer, build_reweighter


class TinyNet(nn.Module):
    def __init__(self, bn: bool = False) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Linear(5, 8)]
        if bn:
            layers.append(nn.BatchNorm1d(8))
        layers += [nn.Tanh(), nn.Linear(8, 6), nn.ReLU()]
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(6, 3)

    def embed(self, x):
        return self.body(x)

    def forward(self, x):
        return self.head(self.body(x))


def reference_weight_grad(model, x, y, w, xm, ym, lr, global_batch):
    """dL_meta(theta - lr * g(w)) / dw by double backward through the virtual step."""
    names = [k for k, _ in model.named_parameters()]
    params = {k: p.detach().clone().requires_grad_(True) for k, p in model.named_parameters()}
    w = w.clone().requires_grad_(True)
    buffers = {k: b.clone() for k, b in model.named_buffers()}
    losses = F.cross_entropy(functional_call(model, (params, buffers), (x,)), y, reduction="none")
    g = torch.autograd.grad((w * losses).sum() / global_batch, [params[k] for k in names], create_graph=True)
    hat = {k: params[k] - lr * gk for k, gk in zip(names, g)}
    buffers = {k: b.clone() for k, b in model.named_buffers()}
    meta = F.cross_entropy(functional_call(model, (hat, buffers), (xm,)), ym)
    return torch.autograd.grad(meta, w)[0]


@pytest.mark.parametrize("bn", [False, True])
def test_weight_gradient_matches_autograd_through_virtual_step(bn):
    torch.manual_seed(0)
    model = TinyNet(bn=bn).double().train()
    x, y = torch.randn(16, 5, dtype=torch.float64), torch.randint(0, 3, (16,))
    xm, ym = torch.randn(4, 5, dtype=torch.float64), torch.randint(0, 3, (4,))
    w = torch.rand(16, dtype=torch.float64)
    ref = reference_weight_grad(copy.deepcopy(model), x, y, w, xm, ym, lr=0.3, global_batch=16)
    opt = torch.optim.SGD(model.parameters(), lr=0.3)
    out = DirectReweighter(meta_lr=0.0).step(model=model, optimizer=opt, x=x, y=y, w=w, x_meta=xm, y_meta=ym,
                                             lr=0.3, global_batch=16, reducer=LocalReducer())
    torch.testing.assert_close(out.weight_grad, ref, rtol=1e-8, atol=1e-12)
    assert ref.abs().max() > 1e-6  # the check is not vacuous


def test_weights_clipped_and_real_step_uses_new_weights():
    torch.manual_seed(1)
    model = TinyNet().double()
    ref_model = copy.deepcopy(model)
    x, y = torch.randn(10, 5, dtype=torch.float64), torch.randint(0, 3, (10,))
    xm, ym = torch.randn(3, 5, dtype=torch.float64), torch.randint(0, 3, (3,))
    w = torch.full((10,), 0.5, dtype=torch.float64)
    eta = 1e4  # large enough to push some weights to the bounds
    out = build_reweighter("direct", meta_lr=eta).step(
        model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), x=x, y=y, w=w, x_meta=xm,
        y_meta=ym, lr=0.1, global_batch=10, reducer=LocalReducer())
    expected_w = (w - eta * out.weight_grad).clamp(0, 1)
    torch.testing.assert_close(out.weights, expected_w)
    assert ((out.weights == 0) | (out.weights == 1)).any()
    # the real step is plain SGD on (1/|B|) sum_j w'_j f_j
    loss = (expected_w * F.cross_entropy(ref_model(x), y, reduction="none")).sum() / 10
    loss.backward()
    with torch.no_grad():
        for p, q in zip(ref_model.parameters(), model.parameters()):
            torch.testing.assert_close(q, p - 0.1 * p.grad)


@pytest.mark.parametrize("mode", ["direct", "l2rw", "mwnet"])
def test_meta_pass_does_not_touch_batchnorm_statistics(mode):
    torch.manual_seed(2)
    model = TinyNet(bn=True).train()
    bn = model.body[1]
    x, y = torch.randn(8, 5), torch.randint(0, 3, (8,))
    # one plain forward gives the expected running stats of a single real forward
    expected = copy.deepcopy(model)
    expected(x)
    build_reweighter(mode, meta_lr=1.0).step(
        model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), x=x, y=y, w=torch.ones(8),
        x_meta=torch.randn(4, 5), y_meta=torch.randint(0, 3, (4,)), lr=0.1, global_batch=8, reducer=LocalReducer())
    torch.testing.assert_close(bn.running_mean, expected.body[1].running_mean)
    torch.testing.assert_close(bn.running_var, expected.body[1].running_var)
    assert int(bn.num_batches_tracked) == 1


def test_unknown_mode_names_choices():
    with pytest.raises(KeyError, match="direct"):
        build_reweighter("nope", meta_lr=1.0)


def test_l2rw_weights_match_autograd_at_zero_eps():
    """Ren et al. 2018: w ~ max(-dL_meta(theta - a sum eps_j grad f_j)/d eps |_{eps=0}, 0), normalised."""
    torch.manual_seed(3)
    model = TinyNet().double()
    x, y = torch.randn(12, 5, dtype=torch.float64), torch.randint(0, 3, (12,))
    xm, ym = torch.randn(4, 5, dtype=torch.float64), torch.randint(0, 3, (4,))
    grad_eps = reference_weight_grad(copy.deepcopy(model), x, y, torch.zeros(12, dtype=torch.float64), xm, ym,
                                     lr=0.2, global_batch=1)
    raw = (-grad_eps).clamp(min=0)
    assert (raw == 0).any() and (raw > 0).any()  # both clipped and kept samples: not vacuous
    expected = raw / raw.sum()
    ref_model = copy.deepcopy(model)
    out = build_reweighter("l2rw").step(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.2), x=x,
                                        y=y, w=torch.ones(12, dtype=torch.float64), x_meta=xm, y_meta=ym, lr=0.2,
                                        global_batch=12, reducer=LocalReducer())
    torch.testing.assert_close(out.weights / 12, expected)
    # the real step is SGD on sum_j w_j f_j
    loss = (expected * F.cross_entropy(ref_model(x), y, reduction="none")).sum()
    loss.backward()
    with torch.no_grad():
        for p, q in zip(ref_model.parameters(), model.parameters()):
            torch.testing.assert_close(q, p - 0.2 * p.grad)


@pytest.mark.parametrize("one_pass", [True, False])
def test_l2rw_clips_every_sample_to_zero_weight_without_nan(monkeypatch, one_pass):
    """When no training sample's gradient agrees with the meta gradient (every <v, grad f_j> <= 0),
    every weight is 0 (eq. S11's normaliser is 0): no NaN, and the real step changes nothing."""
    from pivotal_ray.core import reweight as rw

    real_one, real_two = rw.losses_and_grad_dots, rw.per_sample_grad_dot

    def disagree(*a, **k):  # every sample's gradient disagrees with the meta gradient
        losses, dots = real_one(*a, **k)
        return losses, -dots.abs()

    monkeypatch.setattr(rw, "losses_and_grad_dots", disagree)
    monkeypatch.setattr(rw, "per_sample_grad_dot", lambda *a, **k: -real_two(*a, **k).abs())
    torch.manual_seed(3)
    model = TinyNet().double()
    before = [p.detach().clone() for p in model.parameters()]
    x, y = torch.randn(12, 5, dtype=torch.float64), torch.randint(0, 3, (12,))
    xm, ym = torch.randn(4, 5, dtype=torch.float64), torch.randint(0, 3, (4,))
    out = build_reweighter("l2rw", one_pass=one_pass).step(
        model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.2), x=x, y=y,
        w=torch.ones(12, dtype=torch.float64), x_meta=xm, y_meta=ym, lr=0.2, global_batch=12, reducer=LocalReducer())
    assert torch.equal(out.weights, torch.zeros(12, dtype=torch.float64)) and out.loss == 0.0
    for p, q in zip(before, model.parameters()):
        assert torch.isfinite(q).all() and torch.equal(p, q)


def test_class_balanced_meta_loss_is_the_mean_of_class_means():
    from pivotal_ray.core.reweight import meta_loss_fn

    torch.manual_seed(0)
    logits, y = torch.randn(7, 4, dtype=torch.float64), torch.tensor([0, 0, 0, 1, 2, 2, 0])
    per = F.cross_entropy(logits, y, reduction="none")
    expected = torch.stack([per[y == c].mean() for c in (0, 1, 2)]).mean()  # class 3 absent: not counted
    torch.testing.assert_close(meta_loss_fn(logits, y, class_balanced=True), expected)
    assert not torch.allclose(meta_loss_fn(logits, y), expected)  # the plain mean differs here
    yb = torch.tensor([0, 1, 2, 3, 0, 1, 2])[:4]  # one sample per class: the two agree
    torch.testing.assert_close(meta_loss_fn(logits[:4], yb, class_balanced=True), meta_loss_fn(logits[:4], yb))


@pytest.mark.parametrize("mode", ["direct", "l2rw"])
def test_class_balanced_meta_gradient_matches_autograd(mode):
    """With ``meta_class_balanced`` the weight gradient is that of the class-balanced meta loss."""
    from pivotal_ray.core.reweight import meta_loss_fn

    torch.manual_seed(5)
    model = TinyNet().double()
    x, y = torch.randn(10, 5, dtype=torch.float64), torch.randint(0, 3, (10,))
    xm, ym = torch.randn(5, 5, dtype=torch.float64), torch.tensor([0, 0, 0, 1, 2])
    lr, w0 = 0.3, (torch.ones(10) if mode == "l2rw" else torch.rand(10)).double()
    names = [k for k, _ in model.named_parameters()]
    params = {k: p.detach().clone().requires_grad_(True) for k, p in model.named_parameters()}
    w = (torch.zeros(10, dtype=torch.float64) if mode == "l2rw" else w0.clone()).requires_grad_(True)
    scale = 1.0 if mode == "l2rw" else 1.0 / 10  # l2rw: eps_j on sum_j eps_j f_j; direct: (1/|B|) sum_j w_j f_j
    losses = F.cross_entropy(functional_call(model, params, (x,)), y, reduction="none")
    g = torch.autograd.grad(scale * (w * losses).sum(), [params[k] for k in names], create_graph=True)
    hat = {k: params[k] - lr * gk for k, gk in zip(names, g)}
    ref = torch.autograd.grad(meta_loss_fn(functional_call(model, hat, (xm,)), ym, class_balanced=True), w)[0]
    rw = build_reweighter(mode, meta_lr=1.0, meta_class_balanced=True)
    out = rw.step(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=lr), x=x, y=y, w=w0, x_meta=xm,
                  y_meta=ym, lr=lr, global_batch=10, reducer=LocalReducer())
    torch.testing.assert_close(out.weight_grad, ref)


@pytest.mark.parametrize("one_pass", [None, True, False])
@pytest.mark.parametrize("net", ["tiny", "tiny_bn", "lenet5"])
def test_l2rw_one_pass_equals_separate_forward_and_jvp_bit_for_bit(net, one_pass):
    """l2rw's real forward and the JVP of eq. S4 as one dual pass, or as a forward and then the JVP:
    the result (weights, loss, parameters after the step, BatchNorm statistics) is that of the
    separate forward, meta gradient and JVP written out here, exactly, over several steps
    (linear layers, BatchNorm, and LeNet-5's convolutions and pooling)."""
    from pivotal_ray.core.models import build_model
    from pivotal_ray.core.reweight import _apply_step, _unflat, meta_gradient, per_sample_grad_dot

    torch.manual_seed(6)
    shape, C = ((1, 28, 28), 10) if net == "lenet5" else ((5,), 3)
    model = (build_model({"name": "lenet5"}, C, shape, seed=6) if net == "lenet5" else TinyNet(bn=net == "tiny_bn")).train()
    ref = copy.deepcopy(model)
    opt, ref_opt = (torch.optim.SGD(m.parameters(), lr=0.2, momentum=0.5) for m in (model, ref))
    xm, ym = torch.randn(5, *shape), torch.randint(0, C, (5,))
    rw = build_reweighter("l2rw", one_pass=one_pass)
    for step in range(3):
        x, y = torch.randn(12, *shape), torch.randint(0, C, (12,))
        out = rw.step(model=model, optimizer=opt, x=x, y=y, w=torch.ones(12), x_meta=xm, y_meta=ym, lr=0.2,
                      global_batch=12, reducer=LocalReducer())
        named = [(k, p) for k, p in ref.named_parameters()]
        params = [p for _, p in named]
        losses = F.cross_entropy(ref(x), y, reduction="none")  # the real forward
        v, meta_loss = meta_gradient(ref, {k: p.detach() for k, p in named}, xm, ym, reducer=LocalReducer())
        dots = per_sample_grad_dot(ref, dict(named), x, y, _unflat(v, params))
        raw = (0.2 * dots).clamp(min=0.0)
        new_w = raw / raw.sum()
        loss = (new_w * losses).sum()
        _apply_step(loss, params, ref_opt, LocalReducer())
        assert (raw == 0).any() and (raw > 0).any()  # clipped and kept samples: not vacuous
        assert torch.equal(out.weights, new_w * 12) and out.loss == float(loss.detach()) and out.meta_loss == meta_loss
        assert torch.equal(out.weight_grad, -0.2 * dots)
        for (k, a), b in zip(model.state_dict().items(), ref.state_dict().values()):
            assert torch.equal(a, b), k


@pytest.mark.parametrize("bn, one_pass", [(False, True), (True, False)])
def test_l2rw_takes_one_pass_only_without_normalisation_layers(monkeypatch, bn, one_pass):
    """Through normalisation layers the one-pass graph keeps about twice the activations: such a
    model gets the forward and then the JVP."""
    from pivotal_ray.core import reweight as rw

    calls = []
    for name in ("losses_and_grad_dots", "per_sample_grad_dot"):
        real = getattr(rw, name)
        monkeypatch.setattr(rw, name, lambda *a, _real=real, _name=name, **k: calls.append(_name) or _real(*a, **k))
    model = TinyNet(bn=bn).train()
    assert rw.has_normalisation(model) == bn
    rw.build_reweighter("l2rw").step(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                                     x=torch.randn(8, 5), y=torch.randint(0, 3, (8,)), w=torch.ones(8),
                                     x_meta=torch.randn(4, 5), y_meta=torch.randint(0, 3, (4,)), lr=0.1,
                                     global_batch=8, reducer=LocalReducer())
    assert calls == ["losses_and_grad_dots" if one_pass else "per_sample_grad_dot"]


@pytest.mark.parametrize("layer", [nn.BatchNorm1d(4), nn.InstanceNorm1d(4), nn.GroupNorm(2, 4), nn.LayerNorm(4),
                                   nn.RMSNorm(4), nn.LocalResponseNorm(2)])
def test_has_normalisation_finds_each_kind(layer):
    from pivotal_ray.core.reweight import has_normalisation

    assert has_normalisation(nn.Sequential(nn.Linear(3, 4), nn.Sequential(layer)))
    assert not has_normalisation(nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Conv1d(1, 2, 3)))

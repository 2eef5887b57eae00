"""Model contract: forward == head(embed), shapes, torch.func compatibility (spec sections 2-3)."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, jvp, vmap

from pivotal_ray.config import ConfigError, ModelConfig
from pivotal_ray.core.models import MODELS, build_model, frozen_batchnorm_stats, has_batchnorm

# (name, input_shape, d) on tiny inputs to keep the suite fast: the CIFAR ResNets reach layer4 at
# 1 x 1 from 8 x 8, the ImageNet ones (stride-2 stem + max-pool) from 16 x 16.
CASES = [
    ("mlp", (2,), 8),
    ("lenet5", (1, 28, 28), 84),
    ("resnet18_cifar", (3, 8, 8), 512),
    ("resnet34_cifar", (3, 8, 8), 512),
    ("resnet18", (3, 16, 16), 512),
    ("resnet34", (3, 16, 16), 512),
    ("resnet50", (3, 16, 16), 2048),
]
C = 5


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """The inputs here are tiny: one intra-op thread is fastest, and with 2 cores shared by the
    rest of the suite OpenMP's spinning threads made these tests 10x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _model(name, shape):
    return build_model({"name": name, "hidden": 8, "depth": 2}, C, shape, seed=0)


def test_registry_lists_every_contract_model():
    assert {n for n, _, _ in CASES} <= set(MODELS.names())


@pytest.mark.parametrize("name,shape,d", CASES)
def test_shapes_and_forward_is_head_of_embed(name, shape, d):
    model = _model(name, shape).eval()
    x = torch.randn(3, *shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        z, h = model(x), model.embed(x)
        assert z.shape == (3, C) and h.shape == (3, d)
        assert model.feature_dim == d
        assert isinstance(model.head, nn.Linear) and model.head.in_features == d and model.head.out_features == C
        torch.testing.assert_close(z, model.head(h), rtol=0, atol=0)


def _params(model):
    return {k: v.detach() for k, v in model.named_parameters()}


@pytest.mark.parametrize("name,shape,d,train", [c + (True,) for c in CASES] + [CASES[2] + (False,)])
def test_jvp_matches_reverse_mode_identity(name, shape, d, train):
    """u . (J t) computed by torch.func.jvp == <grad_p (u . f(p)), t> computed by autograd."""
    model = _model(name, shape).train(train)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, *shape, generator=g)
    # Tangents on the stem and the head: the stem's tangent flows through every later layer (so every
    # ReLU, residual add and BatchNorm runs in forward mode) while the weight gradients stay cheap.
    names = [k for k, _ in model.named_parameters()]
    p = {k: v for k, v in _params(model).items() if k in set(names[:2] + names[-2:])}
    buffers = {k: v.clone() for k, v in model.named_buffers()}
    t = {k: torch.randn(v.shape, generator=g) for k, v in p.items()}
    u = torch.randn(2, C, generator=g)

    def f(params):
        return functional_call(model, ({**params, **buffers}), (x,), strict=False)

    with frozen_batchnorm_stats(model):
        _, tangent_out = jvp(f, (p,), (t,))  # (2, C)
        grads = torch.autograd.grad((f({k: v.requires_grad_() for k, v in dict(p).items()}) * u).sum(),
                                    list(p.values()))
    lhs = (u * tangent_out).sum()
    rhs = sum((gk * t[k]).sum() for gk, k in zip(grads, p))
    torch.testing.assert_close(lhs, rhs, rtol=1e-3, atol=1e-3 * float(abs(rhs)) + 1e-4)
    for k, v in model.named_buffers():  # the frozen block leaves running statistics alone
        assert torch.equal(v, buffers[k])


def test_jvp_agrees_with_central_differences_in_float64():
    model = _model("resnet18_cifar", (3, 8, 8)).double().train()
    g = torch.Generator().manual_seed(2)
    x = torch.randn(4, 3, 8, 8, generator=g, dtype=torch.float64)
    p = _params(model)
    t = {k: torch.randn(v.shape, generator=g, dtype=torch.float64) for k, v in p.items()}
    with frozen_batchnorm_stats(model):
        f = lambda params: functional_call(model, params, (x,))  # noqa: E731
        _, jt = jvp(f, (p,), (t,))
        eps = 1e-9  # tiny, so that no ReLU kink lies within eps * t (float64 keeps the quotient exact enough)
        with torch.no_grad():
            fd = (f({k: p[k] + eps * t[k] for k in p}) - f({k: p[k] - eps * t[k] for k in p})) / (2 * eps)
    torch.testing.assert_close(jt, fd, rtol=1e-5, atol=1e-6 * float(fd.abs().max()))


@pytest.mark.parametrize("name,shape", [("lenet5", (1, 28, 28)), ("resnet18_cifar", (3, 8, 8)), ("mlp", (2,))])
def test_vmap_per_sample_grads_equal_a_loop_of_backward_passes(name, shape):
    model = _model(name, shape).eval()  # per-sample gradients use running BN statistics
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(3, *shape, generator=g), torch.tensor([0, 4, 2])
    # Gradients of the first and last blocks only (the forward still runs through every layer), so
    # the ResNet case stays small: 3 x 11M per-sample gradients would dominate the test time.
    names = [k for k, _ in model.named_parameters()]
    wanted = set(names[:4] + names[-4:])
    p = {k: v for k, v in _params(model).items() if k in wanted}

    def loss(params, xi, yi):
        return nn.functional.cross_entropy(functional_call(model, params, (xi[None],), strict=False), yi[None])

    per_sample = vmap(grad(loss), in_dims=(None, 0, 0))(p, x, y)
    for i in range(3):
        model.zero_grad()
        nn.functional.cross_entropy(model(x[i:i + 1]), y[i:i + 1]).backward()
        for k, v in model.named_parameters():
            if k in wanted:
                torch.testing.assert_close(per_sample[k][i], v.grad, rtol=1e-4, atol=1e-6)


def test_frozen_batchnorm_uses_batch_stats_without_updating_running_stats():
    model = _model("resnet18_cifar", (3, 8, 8)).train()
    x = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(4))
    before = {k: v.clone() for k, v in model.named_buffers()}
    with torch.no_grad(), frozen_batchnorm_stats(model):
        frozen_out = model(x)
    assert all(torch.equal(v, before[k]) for k, v in model.named_buffers())
    with torch.no_grad():
        normal_out = model(x)  # plain train mode: same normalisation, but the stats move
    torch.testing.assert_close(frozen_out, normal_out)
    assert not torch.equal(model.body.bn1.running_mean, before["body.bn1.running_mean"])
    assert has_batchnorm(model) and not has_batchnorm(_model("lenet5", (1, 28, 28)))


def test_lenet5_has_the_classic_61706_parameters():
    model = build_model({"name": "lenet5"}, 10, (1, 28, 28))
    # conv 1*6*25+6, conv 6*16*25+16, fc 400*120+120, fc 120*84+84, fc 84*10+10
    expected = 156 + 2416 + 48120 + 10164 + 850
    assert sum(v.numel() for v in model.parameters()) == expected == 61706
    assert model.feature_dim == 84 and model.head.in_features == 84


def test_mlp_depth_and_width_follow_the_config():
    model = build_model(ModelConfig(name="mlp", hidden=16, depth=3), 2, (2,))
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(2, 16), (16, 16), (16, 16), (16, 2)]


def test_cifar_resnet_keeps_resolution_in_the_stem_and_matches_the_standard_size():
    model = build_model({"name": "resnet18_cifar"}, 10, (3, 32, 32))
    assert model.body.conv1.kernel_size == (3, 3) and model.body.conv1.stride == (1, 1)
    assert isinstance(model.body.maxpool, nn.Identity)
    assert sum(v.numel() for v in model.parameters()) == 11_173_962  # the usual CIFAR ResNet-18 count
    assert not any(m.inplace for m in model.modules() if isinstance(m, nn.ReLU))


def test_build_model_is_deterministic_and_leaves_the_global_rng_alone():
    state = torch.random.get_rng_state()
    a = build_model({"name": "lenet5"}, 10, (1, 28, 28), seed=3)
    b = build_model({"name": "lenet5"}, 10, (1, 28, 28), seed=3)
    c = build_model({"name": "lenet5"}, 10, (1, 28, 28), seed=4)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())
    assert not torch.equal(a.head.weight, c.head.weight)
    # seed=None: the caller's (forked, seeded) global RNG decides, as for any nn.Module
    inits = []
    for _ in range(2):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(11)
            inits.append(build_model({"name": "lenet5"}, 10, (1, 28, 28)).head.weight)
    assert torch.equal(inits[0], inits[1]) and not torch.equal(inits[0], a.head.weight)


def test_bad_model_input_names_the_fix():
    with pytest.raises(KeyError, match="choose one of"):
        build_model({"name": "vgg16"}, 10, (3, 32, 32))
    with pytest.raises(ConfigError, match="model.name=mlp"):
        build_model({"name": "lenet5"}, 2, (2,))
    with pytest.raises(ConfigError, match="unknown key"):
        build_model({"name": "mlp", "widht": 3}, 2, (2,))


# ----------------------------------------------------------------------------- mutation audit
def test_lenet5_computes_the_classic_stack():
    """conv(5x5, pad 2) -> ReLU -> max-pool 2 -> conv(5x5) -> ReLU -> max-pool 2 -> fc120 -> ReLU
    -> fc84 -> ReLU (= x~, d = 84) -> head, recomputed with functional ops from the model's weights."""
    import torch.nn.functional as F

    model = build_model({"name": "lenet5"}, 10, (1, 28, 28), seed=0).eval()
    w = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert [type(m).__name__ for m in w] == ["Conv2d", "Conv2d", "Linear", "Linear", "Linear"]
    x = torch.randn(4, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    h = F.max_pool2d(F.relu(F.conv2d(x, w[0].weight, w[0].bias, padding=2)), 2)  # (4, 6, 14, 14)
    h = F.max_pool2d(F.relu(F.conv2d(h, w[1].weight, w[1].bias)), 2)  # (4, 16, 5, 5)
    h = F.relu(F.linear(F.relu(F.linear(h.flatten(1), w[2].weight, w[2].bias)), w[3].weight, w[3].bias))
    with torch.no_grad():
        torch.testing.assert_close(model.embed(x), h, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(model(x), F.linear(h, model.head.weight, model.head.bias), rtol=1e-5, atol=1e-6)
    assert w[-1] is model.head


def test_imagenet_resnet_on_non_rgb_inputs_keeps_the_imagenet_stem():
    model = build_model({"name": "resnet18"}, 3, (1, 32, 32), seed=0).eval()
    conv = model.body.conv1
    assert (conv.in_channels, conv.kernel_size, conv.stride, conv.padding) == (1, (7, 7), (2, 2), (3, 3))
    assert isinstance(model.body.maxpool, nn.MaxPool2d)
    with torch.no_grad():
        assert model(torch.randn(2, 1, 32, 32)).shape == (2, 3)


def test_pretrained_weights_need_rgb_inputs(monkeypatch):
    import pivotal_ray.core.models as models

    def no_download(weights=None):  # the check must come before any weights are fetched
        raise AssertionError(f"resnet18(weights={weights!r}) called")

    monkeypatch.setitem(models._TV_RESNETS, "resnet18", no_download)
    with pytest.raises(ConfigError, match="model.pretrained=false"):
        build_model({"name": "resnet18", "pretrained": True}, 10, (1, 32, 32))


@pytest.mark.parametrize("num_classes,shape,match", [(1, (2,), "num_classes=1"), (0, (2,), "num_classes=0"),
                                                     (3, (0,), "input_shape"), (3, (1, 0, 28), "input_shape")])
def test_degenerate_class_counts_and_input_shapes_are_refused(num_classes, shape, match):
    with pytest.raises(ConfigError, match=match):
        build_model({"name": "mlp"}, num_classes, shape)


def test_mlp_applies_relu_after_every_hidden_layer():
    import torch.nn.functional as F

    model = build_model({"name": "mlp", "hidden": 6, "depth": 3}, 4, (2, 3), seed=0).eval()
    lin = [m for m in model.modules() if isinstance(m, nn.Linear)]
    x = torch.randn(5, 2, 3, generator=torch.Generator().manual_seed(0))
    h = x.flatten(1)
    for m in lin[:-1]:
        h = F.relu(F.linear(h, m.weight, m.bias))
    with torch.no_grad():
        torch.testing.assert_close(model.embed(x), h, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(model(x), F.linear(h, lin[-1].weight, lin[-1].bias), rtol=1e-6, atol=1e-6)

"""The ``mwnet`` and ``none`` re-weighting modes against plain-autograd references (spec section 2)."""

from __future__ import annotations

import copy
import io
import threading

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from pivotal_ray.core.mwnet import MWNetReweighter
from pivotal_ray.core.reweight import LocalReducer, build_reweighter
from tests.unit.test_reweight import TinyNet


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _problem(seed: int, b: int = 12, m: int = 4):
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(b, 5, generator=g, dtype=torch.float64), torch.randint(0, 3, (b,), generator=g)
    xm, ym = torch.randn(m, 5, generator=g, dtype=torch.float64), torch.randint(0, 3, (m,), generator=g)
    return x, y, xm, ym


def _mwnet(seed: int = 0, *, meta_lr: float = 0.5) -> MWNetReweighter:
    rw = build_reweighter("mwnet", meta_lr=meta_lr, seed=seed, optimizer="sgd", weight_decay=0.0)
    rw.net.double()
    return rw


def _net_fn(net_params: dict, loss: torch.Tensor) -> torch.Tensor:
    """V(loss; phi) written out from the parameters (independent of MetaWeightNet.forward)."""
    h = (loss[:, None] @ net_params["fc1.weight"].T + net_params["fc1.bias"]).clamp(min=0)
    return torch.sigmoid(h @ net_params["fc2.weight"].T + net_params["fc2.bias"])[:, 0]


def reference_net_grad(model, net, x, y, xm, ym, lr):
    """dL_meta(theta_hat(phi))/dphi by double backward through the virtual step (MW-Net's recipe)."""
    names = [k for k, _ in model.named_parameters()]
    params = {k: p.detach().clone().requires_grad_(True) for k, p in model.named_parameters()}
    phi = {k: p.detach().clone().requires_grad_(True) for k, p in net.named_parameters()}
    buffers = {k: b.clone() for k, b in model.named_buffers()}
    losses = F.cross_entropy(functional_call(model, (params, buffers), (x,)), y, reduction="none")
    w = _net_fn(phi, losses.detach())
    w_norm = w / w.sum()
    g = torch.autograd.grad((w_norm * losses).sum(), [params[k] for k in names], create_graph=True)
    hat = {k: params[k] - lr * gk for k, gk in zip(names, g)}
    meta = F.cross_entropy(functional_call(model, (hat, {k: b.clone() for k, b in model.named_buffers()}), (xm,)), ym)
    grads = torch.autograd.grad(meta, list(phi.values()))
    return dict(zip(phi, grads))


@pytest.mark.parametrize("bn", [False, True])
def test_mwnet_net_gradient_matches_autograd_through_the_virtual_step(bn):
    torch.manual_seed(0)
    model = TinyNet(bn=bn).double().train()
    x, y, xm, ym = _problem(1)
    rw = _mwnet(meta_lr=0.5)
    phi0 = {k: p.detach().clone() for k, p in rw.net.named_parameters()}
    ref = reference_net_grad(copy.deepcopy(model), rw.net, x, y, xm, ym, lr=0.3)
    assert max(float(g.abs().max()) for g in ref.values()) > 1e-6  # not vacuous
    rw.step(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.3), x=x, y=y,
            w=torch.ones(12, dtype=torch.float64), x_meta=xm, y_meta=ym, lr=0.3, global_batch=12,
            reducer=LocalReducer())
    for k, p in rw.net.named_parameters():  # plain SGD on phi: phi' = phi - eta * dL/dphi
        torch.testing.assert_close(p.detach(), phi0[k] - 0.5 * ref[k], rtol=1e-7, atol=1e-10)


def test_mwnet_real_step_uses_the_updated_net_and_weights_are_in_unit_interval():
    torch.manual_seed(1)
    model = TinyNet().double()
    ref_model = copy.deepcopy(model)
    x, y, xm, ym = _problem(2, b=10)
    rw = _mwnet(meta_lr=2.0)
    out = rw.step(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), x=x, y=y,
                  w=torch.zeros(10, dtype=torch.float64), x_meta=xm, y_meta=ym, lr=0.1, global_batch=10,
                  reducer=LocalReducer())
    losses = F.cross_entropy(ref_model(x), y, reduction="none")
    phi = dict(rw.net.named_parameters())
    w_new = _net_fn({k: p.detach() for k, p in phi.items()}, losses.detach())
    torch.testing.assert_close(out.weights, w_new)
    assert ((out.weights >= 0) & (out.weights <= 1)).all() and out.weights.std() > 0
    ((w_new / w_new.sum()) * losses).sum().backward()
    with torch.no_grad():
        for p, q in zip(ref_model.parameters(), model.parameters()):
            torch.testing.assert_close(q, p - 0.1 * p.grad)
    assert torch.isfinite(torch.tensor(out.meta_loss)) and out.weight_grad.shape == (10,)


def test_mwnet_state_round_trip_restores_net_and_optimizer():
    torch.manual_seed(2)
    x, y, xm, ym = _problem(3)
    x, xm = x.float(), xm.float()  # float32, as in training: the net stays in its own dtype
    model = TinyNet()
    rw = build_reweighter("mwnet", meta_lr=1e-2, seed=5)  # Adam: the optimizer holds moments
    kw = dict(x=x, y=y, w=torch.ones(12), x_meta=xm, y_meta=ym, lr=0.1, global_batch=12,
              reducer=LocalReducer())
    rw.step(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), **kw)
    buf = io.BytesIO()
    torch.save(rw.state_dict(), buf)
    state = torch.load(io.BytesIO(buf.getvalue()), weights_only=True)  # what train.py does
    other = build_reweighter("mwnet", meta_lr=1e-2, seed=99)  # a different initial net
    other.load_state_dict(state)
    for a, b in zip(rw.net.parameters(), other.net.parameters()):
        torch.testing.assert_close(a, b)
    # the next step agrees too, so the Adam moments came back
    m1, m2 = copy.deepcopy(model), copy.deepcopy(model)
    o1 = rw.step(model=m1, optimizer=torch.optim.SGD(m1.parameters(), lr=0.1), **kw)
    o2 = other.step(model=m2, optimizer=torch.optim.SGD(m2.parameters(), lr=0.1), **kw)
    torch.testing.assert_close(o1.weights, o2.weights)
    fresh = build_reweighter("mwnet", meta_lr=1e-2, seed=99)
    fresh.load_state_dict({"net": state["net"], "optimizer": fresh.opt.state_dict()})
    m3 = copy.deepcopy(model)
    o3 = fresh.step(model=m3, optimizer=torch.optim.SGD(m3.parameters(), lr=0.1), **kw)
    assert not torch.allclose(o3.weights, o1.weights)  # without the moments the step differs


def test_mwnet_resumes_onto_a_model_of_another_dtype():
    """train.py resumes by building a fresh reweighter (net in float32 on the CPU) and loading the
    checkpoint, then steps on the model's device and dtype (float64 here, a GPU on clusters): the
    Adam moments must follow the net there, and the resumed step must equal the uninterrupted one."""
    torch.manual_seed(4)
    x, y, xm, ym = _problem(5)  # float64
    model = TinyNet().double()
    kw = dict(x=x, y=y, w=torch.ones(12, dtype=torch.float64), x_meta=xm, y_meta=ym, lr=0.1, global_batch=12,
              reducer=LocalReducer())
    rw = build_reweighter("mwnet", meta_lr=1e-2, seed=5)  # Adam
    rw.step(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), **kw)
    buf = io.BytesIO()
    torch.save(rw.state_dict(), buf)
    resumed = build_reweighter("mwnet", meta_lr=1e-2, seed=5)
    resumed.load_state_dict(torch.load(io.BytesIO(buf.getvalue()), weights_only=True))
    m1, m2 = copy.deepcopy(model), copy.deepcopy(model)
    o1 = rw.step(model=m1, optimizer=torch.optim.SGD(m1.parameters(), lr=0.1), **kw)
    o2 = resumed.step(model=m2, optimizer=torch.optim.SGD(m2.parameters(), lr=0.1), **kw)
    torch.testing.assert_close(o2.weights, o1.weights)
    p = next(resumed.net.parameters())
    assert p.dtype == torch.float64 and resumed.opt.state[p]["exp_avg"].dtype == torch.float64


def test_mwnet_seed_fixes_the_initial_net():
    a, b, c = (build_reweighter("mwnet", meta_lr=1e-3, seed=s) for s in (1, 1, 2))
    assert all(torch.equal(p, q) for p, q in zip(a.net.parameters(), b.net.parameters()))
    assert not all(torch.equal(p, q) for p, q in zip(a.net.parameters(), c.net.parameters()))
    with pytest.raises(KeyError, match="adam"):
        build_reweighter("mwnet", meta_lr=1e-3, optimizer="rmsprop")


def test_building_the_mwnet_leaves_the_global_rng_alone():
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    build_reweighter("mwnet", meta_lr=1e-3, seed=1)
    assert torch.equal(torch.rand(3), expected)


class ThreadReducer:
    """Sums across W threads (a stand-in for all_reduce with W workers)."""

    def __init__(self, world: int) -> None:
        self.world_size = world
        self._barrier = threading.Barrier(world)
        self._slots: list[torch.Tensor | None] = [None] * world
        self._local = threading.local()

    def bind(self, rank: int) -> "ThreadReducer":
        self._local.rank = rank
        return self

    def sum_(self, flat: torch.Tensor) -> torch.Tensor:
        self._slots[self._local.rank] = flat.clone()
        self._barrier.wait()
        total = sum(self._slots)
        self._barrier.wait()
        flat.copy_(total)
        return flat

    def gather(self, t, sizes):  # pragma: no cover - not used by the step
        raise NotImplementedError

    def run(self, work) -> None:
        """Call ``work(rank, reducer_bound_to_rank)`` on every rank, one thread each; re-raise."""
        errors: list[BaseException] = []

        def one(rank: int) -> None:
            try:
                work(rank, self.bind(rank))
            except BaseException as err:  # surfaced below
                errors.append(err)
                self._barrier.abort()

        threads = [threading.Thread(target=one, args=(r,)) for r in range(self.world_size)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors


def test_mwnet_two_workers_equal_one_process_on_the_union_batch():
    torch.manual_seed(4)
    model = TinyNet().double()
    x, y, xm, ym = _problem(5, b=12)
    single, single_rw = copy.deepcopy(model), _mwnet(seed=3)
    single_rw.step(model=single, optimizer=torch.optim.SGD(single.parameters(), lr=0.2), x=x, y=y,
                   w=torch.ones(12, dtype=torch.float64), x_meta=xm, y_meta=ym, lr=0.2, global_batch=12,
                   reducer=LocalReducer())
    workers = [(copy.deepcopy(model), _mwnet(seed=3)) for _ in range(2)]

    def work(rank: int, reducer: ThreadReducer) -> None:
        m, rw = workers[rank]
        sl = slice(0, 5) if rank == 0 else slice(5, 12)  # unequal shares on purpose
        rw.step(model=m, optimizer=torch.optim.SGD(m.parameters(), lr=0.2), x=x[sl], y=y[sl],
                w=torch.ones(sl.stop - sl.start, dtype=torch.float64), x_meta=xm, y_meta=ym, lr=0.2,
                global_batch=12, reducer=reducer)

    ThreadReducer(2).run(work)
    for m, rw in workers:
        for p, q in zip(single_rw.net.parameters(), rw.net.parameters()):
            torch.testing.assert_close(q, p)
        for p, q in zip(single.parameters(), m.parameters()):
            torch.testing.assert_close(q, p)


@pytest.mark.parametrize("one_pass", [True, False])
def test_l2rw_two_workers_equal_one_process_on_the_union_batch(one_pass):
    """l2rw's collectives in order on every rank (the meta gradient, then the weights' normaliser, then
    the real step's gradient), with the real forward and the JVP in one pass or two: two workers on
    unequal slices take the single process's step on the union batch, over two steps."""
    torch.manual_seed(8)
    model = TinyNet().double()
    steps = [_problem(9 + k, b=12) for k in range(2)]
    single, single_rw = copy.deepcopy(model), build_reweighter("l2rw", one_pass=one_pass)
    single_opt = torch.optim.SGD(single.parameters(), lr=0.2, momentum=0.5)
    expected = []
    for x, y, xm, ym in steps:
        out = single_rw.step(model=single, optimizer=single_opt, x=x, y=y, w=torch.ones(12, dtype=torch.float64),
                             x_meta=xm, y_meta=ym, lr=0.2, global_batch=12, reducer=LocalReducer())
        expected.append(out.weights)
    assert any(((w == 0).any() and (w > 0).any()) for w in expected)  # clipped and kept: not vacuous
    workers = [copy.deepcopy(model) for _ in range(2)]
    got: dict[int, list[torch.Tensor]] = {0: [], 1: []}

    def work(rank: int, reducer: ThreadReducer) -> None:
        m, rw = workers[rank], build_reweighter("l2rw", one_pass=one_pass)
        opt = torch.optim.SGD(m.parameters(), lr=0.2, momentum=0.5)
        sl = slice(0, 5) if rank == 0 else slice(5, 12)  # unequal shares on purpose
        for x, y, xm, ym in steps:
            out = rw.step(model=m, optimizer=opt, x=x[sl], y=y[sl], w=torch.ones(sl.stop - sl.start, dtype=torch.float64),
                          x_meta=xm, y_meta=ym, lr=0.2, global_batch=12, reducer=reducer)
            got[rank].append(out.weights)

    ThreadReducer(2).run(work)
    for k in range(2):
        torch.testing.assert_close(torch.cat([got[0][k], got[1][k]]), expected[k])
    for m in workers:
        for p, q in zip(single.parameters(), m.parameters()):
            torch.testing.assert_close(q, p)


def test_none_mode_is_plain_sgd_and_keeps_the_weights():
    torch.manual_seed(6)
    model = TinyNet(bn=True).double()
    ref_model = copy.deepcopy(model)
    x, y, _, _ = _problem(7, b=8)
    w = torch.ones(8, dtype=torch.float64)
    rw = build_reweighter("none", meta_lr=123.0)
    assert rw.needs_meta is False
    out = rw.step(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), x=x, y=y, w=w,
                  x_meta=None, y_meta=None, lr=0.1, global_batch=8, reducer=LocalReducer())
    torch.testing.assert_close(out.weights, w)
    assert (out.weight_grad == 0).all()
    F.cross_entropy(ref_model(x), y).backward()
    with torch.no_grad():
        for p, q in zip(ref_model.parameters(), model.parameters()):
            torch.testing.assert_close(q, p - 0.1 * p.grad)
    torch.testing.assert_close(dict(model.named_buffers())["body.1.running_mean"],
                               dict(ref_model.named_buffers())["body.1.running_mean"])
    assert rw.state_dict() == {}


def test_average_buffers_makes_workers_hold_the_same_batchnorm_model():
    from pivotal_ray.core.reweight import average_buffers_

    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    workers = [copy.deepcopy(base) for _ in range(2)]
    for r, m in enumerate(workers):  # each worker's running statistics from its own data
        m.train()(torch.randn(8, 3) * (r + 1) + r)
    want = {k: (workers[0].state_dict()[k].double() + workers[1].state_dict()[k].double()) / 2
            for k in ("1.running_mean", "1.running_var")}
    assert not torch.equal(workers[0][1].running_mean, workers[1][1].running_mean)
    ThreadReducer(2).run(lambda rank, reducer: average_buffers_(workers[rank], reducer))
    for m in workers:
        for k, v in want.items():
            torch.testing.assert_close(m.state_dict()[k], v.float())
        assert int(m[1].num_batches_tracked) == 1  # integer buffers untouched
    x = torch.randn(5, 3)
    torch.testing.assert_close(workers[0].eval()(x), workers[1].eval()(x))
    before = copy.deepcopy(base.state_dict())
    average_buffers_(base, LocalReducer())  # one process: nothing changes
    assert all(torch.equal(before[k], v) for k, v in base.state_dict().items())


def test_mwnet_defaults_are_mw_nets():
    # what the training loop builds (only meta_lr and seed given): spec's 1-100-1 MLP, and
    # MW-Net's Adam with weight decay 1e-4, PyTorch's Linear init range +-1/sqrt(fan_in)
    import math

    from pivotal_ray.core.mwnet import MetaWeightNet
    from pivotal_ray.core.seeding import torch_generator

    rw = build_reweighter("mwnet", meta_lr=1e-3, seed=0)
    assert (rw.net.fc1.in_features, rw.net.fc1.out_features, rw.net.fc2.out_features) == (1, 100, 1)
    assert isinstance(rw.opt, torch.optim.Adam)
    assert rw.opt.param_groups[0]["lr"] == 1e-3 and rw.opt.param_groups[0]["weight_decay"] == 1e-4
    for layer in (rw.net.fc1, rw.net.fc2):
        bound = 1.0 / math.sqrt(layer.in_features)
        for p in (layer.weight, layer.bias):
            assert float(p.detach().abs().max()) <= bound
    assert float(rw.net.fc2.weight.detach().abs().max()) > 0.5 / math.sqrt(100)  # the whole range is used
    with pytest.raises(ValueError, match="hidden"):
        MetaWeightNet(hidden=0, generator=torch_generator(0, "mwnet"))

"""Rule sets and passes: activations intercepted in every spelling, closed-form backward."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pytest_saliency.engine.passes import Tap, chunked, forward_backward
from pytest_saliency.engine.rules import ActivationRule, RuleSet
from pytest_saliency.errors import SaliencyError, UnsupportedActivationError
from tests._models import Lambda, assert_unchanged, mlp, randn, small_cnn, snapshot

PLAIN = RuleSet("autograd")


class Scaled(ActivationRule):
    """grad_in = k * grad_out * 1[out > 0]; remembers the ReLU outputs it saw."""

    name = "scaled"

    def __init__(self, k: float):
        self.k = k
        self.seen: list[torch.Tensor] = []

    def backward(self, grad_out, out):
        self.seen.append(out.detach().clone())
        return self.k * grad_out * (out > 0)


class Zero(ActivationRule):
    name = "zero"

    def backward(self, grad_out, out):
        return torch.zeros_like(grad_out)


def test_activation_rule_closed_form():
    # Two ReLUs in series each scale the gradient by k, so the input gradient is k^2 times the
    # plain one; the rule sees each ReLU's output (>= 0), in backward order.
    model = mlp(seed=1, dims=(5, 7, 6, 3)).double()
    x = randn(4, 5, seed=2, dtype=torch.float64)
    plain = forward_backward(model, x, [0, 1, 2, 0], PLAIN)
    rule = Scaled(3.0)
    scaled = forward_backward(model, x, [0, 1, 2, 0], RuleSet("scaled", activation=rule))
    torch.testing.assert_close(scaled.input_grad, 9.0 * plain.input_grad)
    torch.testing.assert_close(scaled.logits, plain.logits)
    hidden1 = F.relu(model[0](x))
    hidden2 = F.relu(model[2](hidden1))
    assert len(rule.seen) == 2
    torch.testing.assert_close(rule.seen[0], hidden2.detach())
    torch.testing.assert_close(rule.seen[1], hidden1.detach())


def test_record_fields():
    model = small_cnn()
    x = randn(3, 3, 8, 8, seed=3)
    record = forward_backward(model, x, None, PLAIN)
    logits = model(x)
    torch.testing.assert_close(record.logits, logits.detach())
    assert torch.equal(record.targets, logits.argmax(1))
    assert torch.equal(record.inputs, x)
    xg = x.clone().requires_grad_(True)
    (expected,) = torch.autograd.grad(model(xg).gather(1, record.targets[:, None]).sum(), xg)
    torch.testing.assert_close(record.input_grad, expected)


def test_output_not_depending_on_inputs_is_refused():
    """A zero map from a model that never reads its input (or detaches it) is no explanation."""

    class Constant(nn.Module):
        def __init__(self):
            super().__init__()
            self.bias = nn.Parameter(torch.ones(3))

        def forward(self, x):
            return self.bias.expand(x.shape[0], 3) * 1.0

    with pytest.raises(SaliencyError, match="Constant does not depend on its inputs"):
        forward_backward(Constant(), randn(2, 4), 1, PLAIN)


SPELLINGS = {
    "nn.ReLU": lambda: nn.ReLU(),
    "nn.ReLU(inplace)": lambda: nn.ReLU(inplace=True),
    "torch.relu": lambda: Lambda(torch.relu),
    "F.relu": lambda: Lambda(F.relu),
    "F.relu(inplace)": lambda: Lambda(lambda x: F.relu(x, inplace=True)),
    "F.relu(x, True)": lambda: Lambda(lambda x: F.relu(x, True)),
    "F.relu(input=)": lambda: Lambda(lambda x: F.relu(input=x)),
    "Tensor.relu": lambda: Lambda(lambda x: x.relu()),
    "Tensor.relu_": lambda: Lambda(lambda x: x.relu_()),
    "torch.relu_": lambda: Lambda(torch.relu_),
}


@pytest.mark.parametrize("spelling", SPELLINGS)
def test_every_relu_spelling_is_intercepted(spelling):
    model = nn.Sequential(nn.Linear(4, 6), SPELLINGS[spelling](), nn.Linear(6, 2))
    x = randn(3, 4, seed=4)
    plain = forward_backward(model, x, 0, PLAIN)
    assert plain.input_grad.abs().max() > 0
    zero = forward_backward(model, x, 0, RuleSet("zero", activation=Zero()))
    assert torch.equal(zero.input_grad, torch.zeros_like(x))
    doubled = forward_backward(model, x, 0, RuleSet("x2", activation=Scaled(2.0)))
    torch.testing.assert_close(doubled.input_grad, 2 * plain.input_grad)
    torch.testing.assert_close(doubled.logits, plain.logits)


def test_reused_module_gets_the_rule_at_every_call():
    relu = nn.ReLU()
    model = nn.Sequential(nn.Linear(4, 5), relu, nn.Linear(5, 5), relu, nn.Linear(5, 2))
    rule = Scaled(2.0)
    x = randn(3, 4, seed=5)
    plain = forward_backward(model, x, 1, PLAIN)
    record = forward_backward(model, x, 1, RuleSet("x2", activation=rule))
    assert len(rule.seen) == 2
    torch.testing.assert_close(record.input_grad, 4 * plain.input_grad)


def test_in_place_relu_on_a_view():
    class Half(nn.Module):
        def __init__(self, in_place):
            super().__init__()
            self.in_place = in_place
            self.a, self.b = nn.Linear(4, 6), nn.Linear(6, 2)

        def forward(self, x):
            h = self.a(x)
            if self.in_place:
                h[:, :3].relu_()
                return self.b(h)
            return self.b(torch.cat([F.relu(h[:, :3]), h[:, 3:]], 1))

    view, copy = Half(True), Half(False)
    copy.load_state_dict(view.state_dict())
    x = randn(3, 4, seed=8)
    for rule in (PLAIN, RuleSet("x2", activation=Scaled(2.0)), RuleSet("0", activation=Zero())):
        expected = forward_backward(copy, x, 0, rule).input_grad
        torch.testing.assert_close(forward_backward(view, x, 0, rule).input_grad, expected)


UNSUPPORTED_FUNCTIONS = {
    "F.gelu": F.gelu,
    "F.silu": F.silu,
    "F.elu": F.elu,
    "F.leaky_relu": F.leaky_relu,
    "torch.sigmoid": torch.sigmoid,
    "Tensor.sigmoid": lambda x: x.sigmoid(),
    "torch.tanh": torch.tanh,
    "Tensor.tanh": lambda x: x.tanh(),
}


class Inner(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


@pytest.mark.parametrize("label", UNSUPPORTED_FUNCTIONS)
def test_unsupported_function_names_itself_the_module_and_method(label):
    with torch.random.fork_rng():  # seeded weights: the plain gradient below must not vanish
        torch.manual_seed(3)
        block = nn.Sequential(nn.Linear(4, 4), Inner(UNSUPPORTED_FUNCTIONS[label]))
        model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), block, nn.Linear(4, 2))
    before = snapshot(model)
    with pytest.raises(UnsupportedActivationError) as info:
        forward_backward(model, randn(2, 4), 0, RuleSet("g", activation=Zero()), method="mymethod")
    message = str(info.value)
    assert label in message and "'2.1'" in message and "'mymethod'" in message
    assert_unchanged(before, snapshot(model))
    # Plain autograd leaves every function alone.
    assert forward_backward(model, randn(2, 4), 0, PLAIN).input_grad.abs().max() > 0


@pytest.mark.parametrize("module", [nn.GELU(), nn.Sigmoid(), nn.LeakyReLU(), nn.Tanh(), nn.SiLU()])
def test_unsupported_module_names_itself_the_module_and_method(module):
    model = nn.Sequential(nn.Linear(4, 4), nn.Sequential(nn.ReLU(), module), nn.Linear(4, 2))
    before = snapshot(model)
    with pytest.raises(UnsupportedActivationError) as info:
        forward_backward(model, randn(2, 4), 0, RuleSet("g", activation=Zero()), method="mine")
    message = str(info.value)
    assert type(module).__name__ in message and "'1.1'" in message and "'mine'" in message
    assert_unchanged(before, snapshot(model))


def test_function_handlers_and_install_are_used_and_removed():
    calls: list[str] = []

    def add_handler(func, args, kwargs):
        calls.append("add")
        return func(*args, **kwargs) * 2  # visible in the logits and in the gradient

    class Residual(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)
            self.head = nn.Linear(4, 2)

        def forward(self, x):
            return self.head(torch.add(self.fc(x), x))

    def install(model, handles, trace):
        handles.append(model.fc.register_forward_hook(lambda m, a, o: calls.append("hook")))

    model = Residual()
    x = randn(3, 4, seed=6)
    before = snapshot(model)
    rules = RuleSet("custom", functions={torch.add: add_handler}, install=install)
    assert not rules.is_plain and PLAIN.is_plain
    record = forward_backward(model, x, 1, rules)
    assert calls == ["hook", "add"]
    assert_unchanged(before, snapshot(model))
    plain = forward_backward(model, x, 1, PLAIN)
    assert calls == ["hook", "add"]  # nothing left installed
    w = model.head.weight[1].detach()
    torch.testing.assert_close(record.input_grad - 2 * plain.input_grad, torch.zeros_like(x))
    torch.testing.assert_close(plain.input_grad, (w @ model.fc.weight.detach() + w).expand(3, 4))


def test_taps_record_activation_and_gradient_per_call():
    relu = nn.ReLU(inplace=True)
    model = nn.Sequential(nn.Linear(4, 5), relu, nn.Linear(5, 5), relu, nn.Linear(5, 2))
    x = randn(3, 4, seed=7)
    record = forward_backward(
        model, x, 0, PLAIN, taps={"lin": Tap(model[2], True), "relu": Tap(relu, False)}
    )
    assert len(record.taps["lin"]) == 1 and len(record.taps["relu"]) == 2
    activation, gradient = record.taps["lin"][0]
    # The activation is a copy from before the in-place ReLU that follows it.
    z = model[2](F.relu(model[0](x)))
    torch.testing.assert_close(activation, z.detach())
    assert (activation < 0).any()
    zg = z.detach().requires_grad_(True)
    (expected,) = torch.autograd.grad(model[4](F.relu(zg))[:, 0].sum(), zg)
    torch.testing.assert_close(gradient, expected)
    assert all(a is None and g is not None for a, g in record.taps["relu"])


def test_chunked_concatenates_tensors_and_tuples():
    x = torch.arange(10.0)[:, None]
    targets = torch.arange(10)
    sizes: list[int] = []

    def run(xs, ts):
        sizes.append(len(xs))
        return xs * 2, ts + 1

    doubled, shifted = chunked(run, x, targets, 4)
    assert sizes == [4, 4, 2]
    assert torch.equal(doubled, x * 2) and torch.equal(shifted, targets + 1)
    assert torch.equal(chunked(lambda xs, ts: xs + 1, x, None, None), x + 1)

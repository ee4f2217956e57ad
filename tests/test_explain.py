"""``explain``: the user's model, inputs and RNG left alone; batching, targets and bad input."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pytest_saliency as ps
from pytest_saliency.errors import SaliencyError, UnsupportedActivationError
from tests._models import (
    assert_unchanged,
    conv1d_net,
    mlp,
    randn,
    small_cnn,
    snapshot,
)

METHODS = ps.methods()  # at collection time, so methods other modules add are covered too
INPUT_SPACE = [
    "gradient", "input_x_gradient", "integrated_gradients", "smoothgrad", "guided_backprop",
    "deconvnet", "rectgrad",
]  # fmt: skip
FAST = {"integrated_gradients": {"steps": 4}, "smoothgrad": {"samples": 3}}


def run(model, x, method, **kw):
    return ps.explain(model, x, method, **{**FAST.get(method, {}), **kw})


def bn_net(seed: int = 0) -> nn.Sequential:
    """A model whose train and eval modes differ (BatchNorm statistics, Dropout)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = nn.Sequential(
            nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Dropout(0.5),
            nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
            nn.Linear(4, 5),
        )  # fmt: skip
        with torch.no_grad():  # non-trivial running statistics
            model[1].running_mean.uniform_(-0.5, 0.5)
            model[1].running_var.uniform_(0.5, 2.0)
    return model


def user_setup(model: nn.Module) -> list[str]:
    """Hooks, a frozen layer and a stale .grad, as a user's model might have them."""
    calls: list[str] = []
    model[0].register_forward_hook(lambda m, a, o: calls.append("forward"))
    model[4].register_forward_pre_hook(lambda m, a: calls.append("pre"))
    model[4].weight.requires_grad_(False)
    model[8].weight.grad = torch.ones_like(model[8].weight)
    return calls


@pytest.mark.parametrize("method", METHODS)
def test_model_inputs_and_rng_untouched(method):
    model = bn_net().train()
    model[3].eval()  # a submodule switched on its own must keep its own flag
    user_setup(model)
    x = randn(2, 3, 8, 8, seed=1).requires_grad_(True)
    x_before = x.detach().clone()
    before = snapshot(model)
    rng = torch.get_rng_state()
    maps = run(model, x, method, target=[1, 2])
    assert torch.equal(torch.get_rng_state(), rng), "global RNG state changed"
    assert_unchanged(before, snapshot(model))
    assert model.training and not model[3].training
    assert torch.equal(x.detach(), x_before) and x.requires_grad and x.grad is None
    # The call ran the model in eval mode: same maps as an eval-mode copy (BatchNorm uses its
    # running statistics, not the batch's).
    expected = run(copy.deepcopy(model).eval(), x_before, method, target=[1, 2])
    torch.testing.assert_close(maps, expected)
    assert maps.shape == (2, 8, 8) and not maps.requires_grad


@pytest.mark.parametrize("method", ["guided_backprop", "deconvnet", "rectgrad"])
@pytest.mark.parametrize("style", ["gelu_module", "gelu_functional"])
def test_model_untouched_after_an_error(method, style):
    model = small_cnn(style).train()
    before = snapshot(model)
    with pytest.raises(UnsupportedActivationError):
        ps.explain(model, randn(2, 3, 8, 8), method)
    assert_unchanged(before, snapshot(model))
    # The error came from inside the forward pass: no rule (torch-function mode) may stay
    # active after it, or the model's own F.gelu would raise here.
    with torch.no_grad():
        model(randn(1, 3, 8, 8))


@pytest.mark.parametrize("method", METHODS)
def test_model_untouched_after_a_bad_target(method):
    model = bn_net().train()
    before = snapshot(model)
    with pytest.raises(ps.SaliencyError, match="out of range"):
        run(model, randn(2, 3, 8, 8), method, target=[0, 5])
    assert_unchanged(before, snapshot(model))


@pytest.mark.parametrize("method", METHODS)
def test_works_under_no_grad(method):
    model = small_cnn()
    x = randn(2, 3, 8, 8, seed=2)
    expected = run(model, x, method, target=1)
    with torch.no_grad():
        got = run(model, x, method, target=1)
        assert not torch.is_grad_enabled()
    torch.testing.assert_close(got, expected)
    assert not x.requires_grad and x.grad is None


@pytest.mark.parametrize("method", METHODS)
def test_batch_equals_single_calls_and_chunks(method):
    model = small_cnn()
    x = randn(4, 3, 8, 8, seed=3)
    targets = torch.tensor([0, 3, 1, 4])
    whole = run(model, x, method, target=targets)
    for batch_size in (1, 3):
        torch.testing.assert_close(run(model, x, method, target=targets, batch_size=batch_size),
                                   whole, rtol=1e-5, atol=1e-6)  # fmt: skip
    if method == "smoothgrad":
        return  # noise is drawn for the whole batch, so a lone sample gets other noise
    for i in range(4):
        single = run(model, x[i : i + 1], method, target=int(targets[i]))
        torch.testing.assert_close(single, whole[i : i + 1], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", INPUT_SPACE)
def test_target_forms(method):
    model = small_cnn(seed=1)
    x = randn(3, 3, 8, 8, seed=2)
    predicted = model(x).argmax(1)
    assert len(set(predicted.tolist())) > 1  # so None is not the same as one int
    by_tensor = run(model, x, method, target=predicted)
    torch.testing.assert_close(run(model, x, method), by_tensor)
    torch.testing.assert_close(run(model, x, method, target=predicted.tolist()), by_tensor)
    torch.testing.assert_close(run(model, x, method, target=tuple(predicted.tolist())), by_tensor)
    as_int = run(model, x, method, target=2)
    torch.testing.assert_close(as_int, run(model, x, method, target=[2, 2, 2]))
    torch.testing.assert_close(as_int, run(model, x, method, target=torch.tensor(2)))
    assert (as_int - by_tensor).abs().max() > 0


@pytest.mark.parametrize("method", INPUT_SPACE)
def test_other_input_ranks(method):
    x1 = randn(3, 2, 10, seed=5)
    maps = run(conv1d_net(), x1, method, target=[0, 1, 2])
    assert maps.shape == (3, 10) and maps.abs().max() > 0
    x2 = randn(3, 6, seed=6)
    maps = run(mlp(dims=(6, 8, 7, 3)), x2, method, target=[0, 1, 2])
    assert maps.shape == (3, 6) and maps.abs().max() > 0


def test_dtype_and_device_follow_the_inputs():
    model = small_cnn().double()
    x = randn(2, 3, 8, 8, seed=7)
    maps = ps.explain(model, x, "gradient", target=0)
    assert maps.dtype == torch.float32 and maps.device == x.device
    expected = ps.explain(model, x.double(), "gradient", target=0)
    torch.testing.assert_close(maps, expected.float())


class TupleModel(nn.Module):
    def __init__(self, kind):
        super().__init__()
        self.kind = kind
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        out = self.fc(x)
        if self.kind == "tuple":
            return out, x
        if self.kind == "dict":  # (a 'logits' entry is read: tests/engine/test_outputs.py)
            return {"scores": out}
        if self.kind == "flat":
            return out.sum(1)
        return out[:, :, None, None]


def bad_calls():
    cnn, x = small_cnn(), randn(2, 3, 8, 8)
    return [
        ("method", lambda: ps.explain(cnn, x, "guided_backprob"), "guided_backprop"),
        ("method type", lambda: ps.explain(cnn, x, 3), "method must be a name"),
        ("option", lambda: ps.explain(cnn, x, "gradient", steps=3), "has no option 'steps'"),
        ("target range", lambda: ps.explain(cnn, x, "gradient", target=5), r"\[0, 4\]"),
        ("negative", lambda: ps.explain(cnn, x, "gradient", target=-1), "out of range"),
        ("target length", lambda: ps.explain(cnn, x, "gradient", target=[0, 1, 2]), r"\[2\]"),
        ("target 2d", lambda: ps.explain(cnn, x, "gradient", target=torch.zeros(2, 1).long()),
         r"shape \(2, 1\)"),
        ("float target", lambda: ps.explain(cnn, x, "gradient", target=torch.zeros(2)), "dtype"),
        ("float list", lambda: ps.explain(cnn, x, "gradient", target=[0.5, 1.0]), "dtype"),
        ("bool target", lambda: ps.explain(cnn, x, "gradient", target=True), "target"),
        ("str target", lambda: ps.explain(cnn, x, "gradient", target="cat"), "target"),
        ("rank 1", lambda: ps.explain(cnn, x[0, 0, 0], "gradient"), r"shape \(8,\)"),
        ("rank 5", lambda: ps.explain(cnn, x[None], "gradient"), "N, C, H, W"),
        ("empty", lambda: ps.explain(cnn, x[:0], "gradient"), "non-empty"),
        ("not a tensor", lambda: ps.explain(cnn, x.numpy(), "gradient"), "ndarray"),
        ("list input", lambda: ps.explain(cnn, x.tolist(), "gradient"), "list"),
        ("int input", lambda: ps.explain(cnn, x.long(), "gradient"), "int64"),
        ("not a model", lambda: ps.explain(lambda t: t, x, "gradient"), "nn.Module"),
        ("tuple out", lambda: ps.explain(TupleModel("tuple"), randn(2, 6), "gradient"), "tuple"),
        ("dict out", lambda: ps.explain(TupleModel("dict"), randn(2, 6), "gradient"), "dict"),
        ("1d out", lambda: ps.explain(TupleModel("flat"), randn(2, 6), "gradient"), r"\(2,\)"),
        ("4d out", lambda: ps.explain(TupleModel("4d"), randn(2, 6), "gradient"),
         r"\(2, 3, 1, 1\)"),
        ("layer", lambda: ps.explain(cnn, x, "gradient", layer="conv2"), "takes no layer"),
        ("layer module", lambda: ps.explain(cnn, x, "rectgrad", layer=cnn.conv2), "no layer"),
        ("batch_size 0", lambda: ps.explain(cnn, x, "gradient", batch_size=0), "batch_size"),
        ("batch_size float", lambda: ps.explain(cnn, x, "gradient", batch_size=2.0), "batch_size"),
    ]  # fmt: skip


@pytest.mark.parametrize(("call", "match"), [c[1:] for c in bad_calls()],
                         ids=[c[0] for c in bad_calls()])  # fmt: skip
def test_bad_input_is_a_clear_error(call, match):
    with pytest.raises(ps.SaliencyError, match=match) as info:
        call()
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize("kind", ["tuple", "dict", "flat"])
@pytest.mark.parametrize("method", ["integrated_gradients", "smoothgrad"])
def test_bad_model_output_is_a_clear_error_for_multi_pass_methods(kind, method):
    # These methods look up the predicted class in a pass of their own.
    with pytest.raises(ps.SaliencyError, match="class scores"):
        ps.explain(TupleModel(kind), randn(2, 6), method)


def test_unknown_method_lists_valid_names():
    with pytest.raises(ps.SaliencyError) as info:
        ps.explain(small_cnn(), randn(1, 3, 8, 8), "integrated_gradient")
    message = str(info.value)
    assert "did you mean 'integrated_gradients'" in message
    for name in METHODS:
        assert repr(name) in message


def test_methods_lists_the_input_space_methods():
    assert set(INPUT_SPACE) <= set(METHODS) and METHODS == sorted(METHODS)
    # Importing the methods subpackage binds ps.methods to it; the call must still work.
    import pytest_saliency.bundled.registry  # noqa: F401
    import pytest_saliency.explainer  # noqa: F401  (the same for ps.explain)
    from pytest_saliency.explainer import explain as explain_function

    assert ps.methods() == METHODS
    x = randn(1, 3, 8, 8)
    torch.testing.assert_close(
        ps.explain(small_cnn(), x, "gradient", target=0),
        explain_function(small_cnn(), x, "gradient", target=0),
    )


def test_functional_relu_on_a_tensor_without_grad_stays_in_place():
    # The rule only matters for tensors autograd tracks; elsewhere x.relu_() must still be
    # an in-place op, or a model that relies on it computes something else.
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 3)

        def forward(self, x):
            mask = torch.linspace(-1, 1, 4)
            mask.relu_()  # not tracked by autograd, used for its side effect
            return self.fc(F.relu(x) * mask)

    model = Net()
    x = randn(2, 4)
    plain = ps.explain(model, x, "gradient", target=0)
    guided = ps.explain(model, x, "deconvnet", target=0)
    assert plain[:, 0].abs().max() == 0 and guided[:, 0].abs().max() == 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
class TestCuda:
    """Maps on CUDA equal CPU maps; the result lives on the inputs' device."""

    @pytest.mark.parametrize("method", METHODS)
    def test_cuda_matches_cpu(self, method):
        model = small_cnn()
        x = randn(3, 3, 8, 8, seed=8)
        expected = run(model, x, method, target=[0, 1, 2])
        cuda_model = copy.deepcopy(model).cuda()
        got = run(cuda_model, x.cuda(), method, target=torch.tensor([0, 1, 2]).cuda())
        assert got.device.type == "cuda"
        torch.testing.assert_close(got.cpu(), expected, rtol=1e-4, atol=1e-4)


def test_public_functions_survive_submodule_imports():
    """Importing a submodule must not replace the public function of the same name."""
    import inspect

    import pytest_saliency as ps
    import pytest_saliency.bundled.cam  # noqa: F401
    import pytest_saliency.checks  # noqa: F401
    import pytest_saliency.explainer  # noqa: F401
    import pytest_saliency.similarities  # noqa: F401

    for name in ("explain", "methods", "similarity", "metrics", "output_sensitivity",
                 "parameter_randomization"):  # fmt: skip
        assert inspect.isfunction(getattr(ps, name)), name
    assert "gradient" in ps.methods()


def test_a_failure_inside_the_model_names_the_call_and_the_inputs():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.LazyLinear(3))
    model(torch.zeros(1, 1, 8, 8))  # materialise the lazy layer
    x = torch.zeros(2, 3, 8, 8)  # 3 channels for a 1-channel model
    for call in (
        lambda: ps.explain(model, x, "gradient"),
        lambda: ps.explain(model, x, "gradcam"),
        lambda: ps.output_sensitivity(model, x, "gradient"),
        lambda: ps.parameter_randomization(model, x, "gradient"),
    ):
        with pytest.raises(
            SaliencyError, match=r"model Sequential failed on inputs of shape"
        ) as info:
            call()
        assert isinstance(info.value.__cause__, RuntimeError)


def test_gpu_kernel_settings_are_exact_inside_a_call_and_the_users_after():
    """cuDNN autotuning and TF32 convolutions are off while maps are made, restored after."""
    cudnn = torch.backends.cudnn
    seen = []

    class Probe(torch.nn.Linear):
        def forward(self, x):
            seen.append((cudnn.deterministic, cudnn.benchmark, _conv_tf32_off()))
            return super().forward(x)

    before = (cudnn.deterministic, cudnn.benchmark)
    cudnn.benchmark = True
    try:
        ps.explain(Probe(4, 3), randn(2, 4), "gradient")
        assert (cudnn.deterministic, cudnn.benchmark) == (before[0], True)
    finally:
        cudnn.deterministic, cudnn.benchmark = before
    assert seen and all(s == (True, False, True) for s in seen)


def _conv_tf32_off() -> bool:
    cudnn = torch.backends.cudnn
    try:
        return not cudnn.allow_tf32
    except RuntimeError:  # torch >= 2.9 with legacy and new settings mixed
        return cudnn.conv.fp32_precision == "ieee"


_TF32_PROBE = """
import sys, torch
from pytest_saliency.engine.state import exact_kernels
B = torch.backends
def read():
    out = {}
    getters = {
        "legacy matmul": lambda: B.cuda.matmul.allow_tf32,
        "legacy cudnn": lambda: B.cudnn.allow_tf32,
        "cublas": lambda: torch._C._get_cublas_allow_tf32(),
        "matmul precision": torch.get_float32_matmul_precision,
    }
    for owner in ("", ".cuda.matmul", ".cudnn", ".cudnn.conv", ".cudnn.rnn"):
        getters["fp32_precision" + owner] = lambda o=owner: eval("B" + o + ".fp32_precision")
    for name, get in getters.items():
        try:
            out[name] = get()
        except (RuntimeError, AttributeError) as exc:
            out[name] = type(exc).__name__
    return out
exec(sys.argv[1])
before = read()
with exact_kernels():
    inside = read()
    try:
        off = not B.cudnn.allow_tf32
    except RuntimeError:
        off = B.cudnn.conv.fp32_precision == "ieee"
after = read()
broken = [k for k in inside if inside[k] == "RuntimeError" and before[k] != "RuntimeError"]
print(repr((off, after == before, broken)))
"""


@pytest.mark.parametrize(
    "user",
    [
        "pass",
        "torch.backends.cuda.matmul.allow_tf32 = True",
        "torch.set_float32_matmul_precision('high')",
        "torch.backends.cudnn.allow_tf32 = False",
        "torch.backends.cuda.matmul.fp32_precision = 'tf32'",
        "torch.backends.cudnn.conv.fp32_precision = 'ieee'",
    ],
)
def test_tf32_settings_of_every_api_read_the_same_after_and_stay_readable(user):
    """However the user set TF32 (legacy flags or torch >= 2.9's fp32_precision), convolutions
    run without TF32 inside, no flag that could be read becomes unreadable, and all read as
    before afterwards. Each case runs in a fresh interpreter: these flags are process-wide."""
    import subprocess
    import sys

    if "fp32_precision" in user and not hasattr(torch.backends.cudnn, "conv"):
        pytest.skip("torch < 2.9 has no fp32_precision settings")
    done = subprocess.run([sys.executable, "-c", _TF32_PROBE, user], capture_output=True,
                          text=True, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    off, restored, broken = eval(done.stdout.strip().splitlines()[-1])
    assert off and restored and broken == [], (off, restored, broken)

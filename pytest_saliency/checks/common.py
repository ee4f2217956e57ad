"""What both audits share: argument checks, comparing maps, the CAM layer, constant-map causes."""

from __future__ import annotations

import math

import torch
from torch import nn

from ..engine.layers import CamLayer, parse_cam_layer, resolve_cam_layer
from ..engine.passes import chunked
from ..engine.state import eval_mode, model_device_dtype
from ..engine.targets import DEFAULT, Objective, call_model
from ..errors import SaliencyError, unknown
from ..explainer import prepare


def check_choice(kind: str, value: object, choices: tuple[str, ...]) -> str:
    if not isinstance(value, str) or value not in choices:
        raise unknown(kind, value, choices)
    return value


def check_metric(metric: object) -> str:
    from ..similarities import metrics

    return check_choice("similarity metric", metric, tuple(metrics()))


def check_seed(seed: object) -> int:
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
        raise SaliencyError(
            f"seed must be an int in [0, 2**63 - 1] (a signed 64-bit seed), got {seed!r}"
        )
    return seed


def setup(model, inputs, method, layer, batch_size, options, metric, seed):
    """Validate the arguments shared by both audits; returns what the audits need.

    The CAM layer is returned as a name so that it can be found again on a copy of the model.
    """
    model, inputs, batch_size, spec, _, resolved = prepare(
        model, inputs, method, layer, batch_size, options
    )
    metric = check_metric(metric)
    seed = check_seed(seed)
    layer_label = None
    if spec.needs_layer and resolved is not None:
        layer_label = parse_cam_layer(model, resolved)[0]
    return model, inputs, batch_size, spec, metric, seed, layer_label


def method_requests(method, layer, options) -> list:
    """The audited methods as :class:`Request` s: one for a name, one per item for a list."""
    from ..multi import Request, as_request

    if isinstance(method, (list, tuple)):
        if not method:
            raise SaliencyError("method is an empty list; give a method name or a list of them")
        if layer is not None or options:
            raise SaliencyError(
                "with a list of methods, give each method's layer and options inside its "
                "mapping, e.g. {'name': 'gradcam', 'layer': 'layer3', 'positive': True}"
            )
        return [as_request(m) for m in method]
    return [Request(method, dict(options), layer)]


def model_inputs(model: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    device, dtype = model_device_dtype(model, inputs)
    return inputs.detach().to(device=device, dtype=dtype)


def cam_layer(model: nn.Module, x: torch.Tensor, spec, layer_label: str | None, options,
              output=None) -> CamLayer | None:  # fmt: skip
    """The CAM layer on ``model`` (the default one when the caller gave none), with its
    layout; found once, on the trained model, and kept for every model state."""
    if not spec.needs_layer:
        return None
    with eval_mode(model):
        return resolve_cam_layer(model, x, spec.name, layer_label, options.get("layout"), output)


def outputs_of(model: nn.Module, x: torch.Tensor, batch_size: int | None,
               objective: Objective = DEFAULT) -> torch.Tensor:  # fmt: skip
    """The scored tensor (class scores [N, classes] by default) from a no-grad forward in eval
    mode (chunked), checked for the objective's target kind."""

    def one(chunk, _):
        with torch.no_grad():
            output = call_model(model, chunk)
            return objective.scores(output, type(model).__name__, chunk.shape[0])

    with eval_mode(model):
        return chunked(one, x, None, batch_size)


def is_constant(maps: torch.Tensor, rtol: float = 1e-5) -> torch.Tensor:
    """A bool [N]: the sample's map has one value everywhere (or is not finite).

    "One value" allows float rounding: a CAM upsampled from a 1x1 layer differs from constant
    in the last bits, and a metric would read structure into that noise.
    """
    from ..similarities import _range

    # Min and max pick values, so they are exact in the maps' own dtype; only the [N]
    # results go to float64. A NaN or infinity anywhere shows up in them.
    low, high = (v.double() for v in _range(maps.detach()))
    finite = torch.isfinite(high) & torch.isfinite(low)
    return ~finite | (high - low <= rtol * torch.maximum(high.abs(), low.abs()))


class Comparer:
    """Scores sets of compared maps against fixed reference maps, prepared once.

    :meth:`score` gives the similarity [N] (CPU float) of compared maps to the reference maps,
    and bool [N] masks of the compared maps that were blank or constant, computed on the maps'
    device; what depends on the reference alone (ranks, window sums, constancy) is
    computed once, however many sets are compared.

    A constant reference map (the explained class on the trained model) says nothing, so the
    sample's score is NaN: the audit cannot judge it. A constant compared map next to a
    structured reference is different: the map changed completely (typically a CAM that the
    ReLU zeroed for another class or a randomized model), so it shares no structure and scores
    0 instead of the metric's undefined value.
    """

    def __init__(self, reference: torch.Tensor, metric: str) -> None:
        from ..similarities import Reference

        self._reference = Reference(reference.detach(), metric)
        self._flat = is_constant(reference).cpu()

    @property
    def constant_reference(self) -> torch.Tensor:
        """A bool [N] (CPU): which reference maps are constant."""
        return self._flat

    def score(self, compared: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(similarity [N], blank [N], constant [N]): ``constant`` marks every constant
        compared map, ``blank`` those next to a structured reference."""
        scores = self._reference(compared.detach()).to("cpu", torch.float32).reshape(-1).clone()
        constant = is_constant(compared).cpu()
        blank = constant & ~self._flat
        scores[blank] = 0.0
        scores[self._flat] = math.nan
        return scores, blank, constant


def compare(
    reference: torch.Tensor, compared: torch.Tensor, metric: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """One :class:`Comparer` score: (similarity [N], blank [N])."""
    scores, blank, _ = Comparer(reference, metric).score(compared)
    return scores, blank


def to_cpu(maps: torch.Tensor) -> torch.Tensor:
    return maps.detach().to("cpu", torch.float32)


def constant_cause(spec, layer: CamLayer | None, x: torch.Tensor) -> str:
    """The likeliest reason why some maps were constant, in words."""
    if spec.needs_layer and layer is not None:
        if math.prod(layer.layout.grid) == 1:
            shape = "x".join(str(s) for s in layer.layout.grid)
            inp = "x".join(str(s) for s in x.shape[2:])
            return (
                f"the CAM {layer.describe()} has a {shape} grid ({layer.layout}) for {inp} "
                f"inputs, so {spec.name} can only give a constant map; pick an earlier layer "
                "with more grid positions (layer=...) or use larger inputs"
            )
        return (
            f"the {spec.name} map was zero everywhere (the ReLU over the weighted activations of "
            f"{layer.describe()}, {layer.layout}, removed every value, or its gradient was zero)"
        )
    return (
        "the map had one value everywhere, usually all zero: no gradient reached the input "
        "for that class (dead ReLUs, saturated outputs, or a constant model output)"
    )


def describe_constant(
    named_maps: dict[str, torch.Tensor],
    scores: torch.Tensor,
    flags: dict[str, torch.Tensor] | None = None,
) -> dict:
    """For each degenerate (NaN) sample, the names of its maps that were constant.

    ``flags`` gives each map's constancy ([N] bool) where it is already known, so the maps need
    not be read again.
    """
    bad = torch.isnan(scores.reshape(-1, scores.shape[-1])).any(dim=0)
    if not bool(bad.any()):
        return {}
    if flags is None:
        flags = {name: is_constant(m) for name, m in named_maps.items()}
    return {
        int(i): [name for name, flag in flags.items() if bool(flag[i])]
        for i in bad.nonzero().flatten()
    }


def describe_blank(blanks: dict[str, torch.Tensor]) -> dict[int, list[str]]:
    """For each sample, the names of the compared maps that were blank (scored 0)."""
    found: dict[int, list[str]] = {}
    for name, mask in blanks.items():
        for i in mask.nonzero().flatten():
            found.setdefault(int(i), []).append(name)
    return dict(sorted(found.items()))

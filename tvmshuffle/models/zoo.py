"""The model zoo: names → constructors, ``get_model``, and MAC / parameter counting.

Names follow torchvision: ``shufflenet_v1_g{groups}_x{width}`` (25 models: groups 1, 2, 3,
4, 8 × width 0.25, 0.5, 1.0, 1.5, 2.0) and ``shufflenet_v2_x{width}`` (4 models: width 0.5,
1.0, 1.5, 2.0), with the width written ``0_25``, ``0_5``, ``1_0``, ``1_5``, ``2_0``.

There are no pretrained weights in the repository. Without ``weights``, :func:`get_model`
returns a reproducible random model: weights drawn with seed 0 (the caller's global RNG
state is left untouched), then the batch-norm running statistics are calibrated with one
training-mode forward pass over a fixed random batch. That keeps activations of order one
through all units (so comparisons against a compiled model are meaningful, not a
comparison of near-zeros) and gives every batch norm non-trivial statistics to fold.

"MACs" are multiply-accumulates of the Conv2d and Linear layers only — what both papers
call FLOPs. Batch norm, pooling, additions and the shuffle are not counted.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..errors import UserError, first_line
from ..frontend import DEFAULT_INPUT_SHAPE
from .shufflenet_v1 import GROUPS as V1_GROUPS
from .shufflenet_v1 import WIDTHS as V1_WIDTHS
from .shufflenet_v1 import ShuffleNetV1
from .shufflenet_v2 import WIDTHS as V2_WIDTHS
from .shufflenet_v2 import ShuffleNetV2

SEED = 0
#: every zoo model takes RGB images: N, 3, H, W
IN_CHANNELS = 3
#: the random batch that calibrates batch-norm statistics of a randomly initialised model
CALIBRATION_SHAPE = (4, 3, 64, 64)


@dataclass(frozen=True)
class ModelSpec:
    """One zoo entry. ``groups`` is the V1 group count; ``None`` for V2 (no group convs)."""

    name: str
    family: str  # "shufflenet_v1" or "shufflenet_v2"
    groups: int | None
    width: float
    constructor: Callable[[], nn.Module]


def _width_suffix(width: float) -> str:
    whole, frac = f"{width:g}.0".split(".")[:2]
    return f"x{whole}_{frac}"


def _build_table() -> dict[str, ModelSpec]:
    table: dict[str, ModelSpec] = {}
    for groups in V1_GROUPS:
        for width in V1_WIDTHS:
            name = f"shufflenet_v1_g{groups}_{_width_suffix(width)}"
            table[name] = ModelSpec(
                name, "shufflenet_v1", groups, width, lambda g=groups, w=width: ShuffleNetV1(groups=g, width=w)
            )
    for width in V2_WIDTHS:
        name = f"shufflenet_v2_{_width_suffix(width)}"
        table[name] = ModelSpec(name, "shufflenet_v2", None, width, lambda w=width: ShuffleNetV2(width=w))
    return table


MODELS: dict[str, ModelSpec] = _build_table()


def _spec(name: str) -> ModelSpec:
    try:
        return MODELS[name]
    except KeyError:
        pass
    close = difflib.get_close_matches(name, list(MODELS), n=3, cutoff=0.6)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    raise UserError(f"unknown model {name!r}{hint} (`tvmshuffle models` lists all {len(MODELS)})")


def _init_weights(model: nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_in", nonlinearity="relu")
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.uniform_(module.weight, 0.5, 1.5)
            nn.init.normal_(module.bias, 0.0, 0.1)
        elif isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, 0.0, 0.01)
            nn.init.zeros_(module.bias)


@torch.no_grad()
def _calibrate_batch_norm(model: nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.reset_running_stats()
            module.momentum = None  # cumulative average: the stats of exactly this batch
    model.train()
    model(torch.randn(CALIBRATION_SHAPE))
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.momentum = 0.1  # PyTorch's default again


def _load_weights(model: nn.Module, name: str, weights: str) -> None:
    path = Path(weights)
    if not path.is_file():
        raise UserError(f"{weights}: weights file not found" if not path.exists() else f"{weights}: not a file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle, zip and unpickler errors all mean "not a state_dict file"
        raise UserError(f"{weights}: cannot read weights (expected a torch.save'd state_dict): "
                        f"{first_line(exc)}") from exc
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]  # a training checkpoint wrapping the state_dict
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{weights}: not a state_dict (expected a dict of tensors, got {type(state).__name__})")
    state = {k.removeprefix("module."): v for k, v in state.items()}  # saved from DataParallel
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()
        detail = " ".join(line.strip() for line in first[1:3]) if len(first) > 1 else first[0]
        raise UserError(f"{weights}: does not fit {name}: {detail}") from exc


def get_model(name: str, weights: str | None = None) -> nn.Module:
    """The zoo model ``name`` in eval mode; random (seed 0, reproducible) unless ``weights``.

    ``weights`` is a file written by ``torch.save(model.state_dict(), path)``; it is read with
    ``weights_only=True``. Unknown names and missing, unreadable or mismatching weight files
    raise :class:`~tvmshuffle.errors.UserError` naming the model or the file.
    """
    spec = _spec(name)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        model = spec.constructor()
        if weights is None:
            _init_weights(model)
            _calibrate_batch_norm(model)
    if weights is not None:
        _load_weights(model, name, weights)
    return model.eval()


def check_input_shape(input_shape: tuple[int, ...]) -> None:
    """Zoo models take RGB images: an ``--input-shape`` with another C is a :class:`UserError`."""
    if input_shape[1] != IN_CHANNELS:
        raise UserError(f"--input-shape {','.join(map(str, input_shape))}: ShuffleNets take "
                        f"{IN_CHANNELS} input channels, got C={input_shape[1]}")


def count_macs(model: nn.Module, input_shape: tuple[int, ...] = DEFAULT_INPUT_SHAPE) -> int:
    """Multiply-accumulates of all Conv2d and Linear layers for one forward pass of ``input_shape``.

    Counted with forward hooks, so it follows the actual forward (shapes, strides, groups).
    The model may live on the ``meta`` device (no memory, no arithmetic). Its train/eval
    mode is restored afterwards and batch-norm statistics are not touched.
    """
    total = 0

    def conv_hook(module: nn.Conv2d, _inputs, output):
        nonlocal total
        kh, kw = module.kernel_size
        total += output.numel() * (module.in_channels // module.groups) * kh * kw

    def linear_hook(module: nn.Linear, _inputs, output):
        nonlocal total
        total += output.numel() * module.in_features

    handles = []
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            handles.append(module.register_forward_hook(conv_hook))
        elif isinstance(module, nn.Linear):
            handles.append(module.register_forward_hook(linear_hook))
    modes = {module: module.training for module in model.modules()}
    first = next(model.parameters(), None)
    device = first.device if first is not None else torch.device("cpu")
    dtype = first.dtype if first is not None else torch.float32
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros(tuple(input_shape), device=device, dtype=dtype))
    except RuntimeError as exc:
        first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        shape = "x".join(map(str, input_shape))
        raise UserError(f"input shape {shape}: the model cannot run on it: {first_line}") from exc
    finally:
        for handle in handles:
            handle.remove()
        for module, training in modes.items():
            module.train(training)
    return int(total)


def count_params(model: nn.Module) -> int:
    """Number of learnable parameters (batch-norm running statistics are buffers, not counted)."""
    return int(sum(p.numel() for p in model.parameters()))


def model_table(input_shape: tuple[int, ...] = DEFAULT_INPUT_SHAPE) -> list[dict]:
    """One row per zoo model: name, family, groups, width, macs (int), params (int).

    Models are built on the ``meta`` device, so this takes well under a second per model.
    """
    check_input_shape(input_shape)
    rows = []
    for spec in MODELS.values():
        with torch.device("meta"):
            model = spec.constructor()
        rows.append({
            "name": spec.name,
            "family": spec.family,
            "groups": spec.groups,
            "width": spec.width,
            "macs": count_macs(model, input_shape),
            "params": count_params(model),
        })
    return rows

"""Torch models by name for the generic torch learner (`[workload] model`).

- `mlp`: flatten -> Linear(d, hidden) -> ReLU -> Linear(hidden, classes); on 784-value inputs
  with torch.manual_seed(0) it is exactly today's W1 model (same names, same initial weights).
- `cnn`: two 3x3 conv (16, 32 channels) + ReLU + 2x2 max-pool blocks, then Linear(., 64),
  ReLU, Linear(64, classes); for 8x8 (digits), 28x28 (MNIST, FEMNIST) and 32x32 (CIFAR-10)
  images, one or three channels. Flat inputs of s*s or 3*s*s values are read as images.
- `logreg`: flatten -> Linear(d, classes) (multinomial logistic regression).
- `module:function` (declared with `@declare("models")`): called with the keyword arguments it
  accepts among `input_shape` (one sample's shape) and `classes`; returns an `nn.Module` whose
  output is [batch, classes].
"""

from __future__ import annotations

import inspect
import math
from typing import Any

from kernel.options import ConfigError

BUILTIN = ("mlp", "cnn", "logreg")


def build(name: str, shape: tuple[int, ...], classes: int, hidden: int = 256) -> Any:
    """A fresh module `name` for samples of `shape` and `classes` outputs, built under the
    caller's torch RNG state; its output shape is checked on a zero batch."""
    import torch
    from torch import nn

    if name == "mlp":
        net: Any = _mlp(math.prod(shape), hidden, classes)
    elif name == "logreg":
        net = _mlp(math.prod(shape), 0, classes)
    elif name == "cnn":
        net = _cnn(_image_shape(shape), classes)
    else:
        net = _user(name, shape, classes)
    if not isinstance(net, nn.Module):
        raise ConfigError(f"[workload] model = {name!r} returned {type(net).__name__}; expected "
                          f"a torch.nn.Module")
    dtype = torch.float32
    probe = torch.zeros((2, *shape), dtype=dtype)
    try:
        with torch.no_grad():
            out = net(probe)
    except Exception as exc:  # noqa: BLE001 - a user's module can raise anything
        raise ConfigError(f"[workload] model = {name!r} fails on a batch of shape "
                          f"{tuple(probe.shape)}: {type(exc).__name__}: {exc}") from None
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (2, classes):
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ConfigError(f"[workload] model = {name!r} returns output of shape {got} for a "
                          f"batch of 2; expected (2, {classes}) (batch, classes)")
    return net


def _mlp(d: int, hidden: int, classes: int) -> Any:
    from torch import nn

    class Flat(nn.Sequential):
        """nn.Sequential on flattened samples (parameter names stay 0.weight, ...)."""

        def forward(self, x: Any) -> Any:
            return super().forward(x.flatten(1))

    if hidden == 0:
        return Flat(nn.Linear(d, classes))
    return Flat(nn.Linear(d, hidden), nn.ReLU(), nn.Linear(hidden, classes))


def _image_shape(shape: tuple[int, ...]) -> tuple[int, int, int]:
    if len(shape) == 3:
        return shape[0], shape[1], shape[2]
    if len(shape) == 2:
        return 1, shape[0], shape[1]
    if len(shape) == 1:
        for ch in (1, 3):
            side = math.isqrt(shape[0] // ch)
            if shape[0] % ch == 0 and side * side * ch == shape[0]:
                return ch, side, side
    raise ConfigError(f"[workload] model = 'cnn' needs image samples ([C, H, W], [H, W], or "
                      f"s*s or 3*s*s values); these have shape {shape}")


def _cnn(shape: tuple[int, int, int], classes: int) -> Any:
    from torch import nn

    c, h, w = shape
    if h < 4 or w < 4:
        raise ConfigError(f"[workload] model = 'cnn' needs images of at least 4x4; these are "
                          f"{h}x{w}")

    class CNN(nn.Module):
        """Two conv blocks and two linear layers."""

        def __init__(self) -> None:
            super().__init__()
            self.features = nn.Sequential(
                nn.Conv2d(c, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
            self.head = nn.Sequential(nn.Linear(32 * (h // 4) * (w // 4), 64), nn.ReLU(),
                                      nn.Linear(64, classes))

        def forward(self, x: Any) -> Any:
            return self.head(self.features(x.reshape(-1, c, h, w)).flatten(1))

    return CNN()


def _user(name: str, shape: tuple[int, ...], classes: int) -> Any:
    from protocols.learning.names import resolve

    fn = resolve("models", name, "[workload] model", BUILTIN)
    if not callable(fn):
        raise ConfigError(f"[workload] model = {name!r} is {type(fn).__name__}; expected a "
                          f"function returning a torch.nn.Module")
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        params = {}  # type: ignore[assignment]
    offered = {"input_shape": shape, "classes": classes}
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return fn(**offered)
    return fn(**{k: v for k, v in offered.items() if k in params})

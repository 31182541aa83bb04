"""Error feedback for lossy codec stages, usable by any protocol, and `fedavg_ef`: FedAvg whose
clients send compressed model deltas with error feedback, built around protocols.fedavg as is.

Error feedback (EF-SGD: Seide et al. 2014, Karimireddy et al. 2019; CHOCO-style compressed
differences use the same bookkeeping): a node adds the residual it kept from its previous call
to its new update, sends what the lossy stages make of the sum, and keeps sum - sent as the next
residual. So the sum of what a node sent trails the sum of its true updates by exactly its
current residual, which a contractive stage (top-k, quantisation) keeps bounded.

`ErrorFeedback` applies the same stages the codec will (the `[codec]` rules for one message kind
and body field, through kernel.wire.stages) and returns the decoded values; as every stage is a
projection, the codec leaves those values unchanged on the wire, so what the node sends is
exactly what its receiver decodes, on every transport.

State: one float32 residual per (node, tensor), created on a node's first call: memory is the
model's size times the number of nodes that ever sent (W2's mlp: 0.81 MB per client, so at
most 81 MB for 100 clients; W5's 10,000 clients would need 8 GB: `forget` nodes, or keep error
feedback off there). `nbytes` reports it.

`fedavg_ef` (`[protocol] name = "protocols.compression:fedavg_ef"`, every FedAvg key plus
`error_feedback = true|false`): clients reply `update` with `delta` (trained - received model,
error-fed) instead of `model`; the server adds each delta to the global model it sent that
round and hands FedAvg's server the model it expects. Pair it with a `[codec]` rule for
`update` (e.g. `[codec.stages] update = ["topk"]`). Each client's reply emits a
"compression" row (value: the round) with `raw_bytes`, `sent_bytes` (after the stages,
before lossless compression) and `residual` (the residual's L2 norm).
"""

from __future__ import annotations

import functools
from collections.abc import Hashable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from kernel.api import Context, Deployment, Protocol
from kernel.messages import Message
from kernel.options import ConfigError
from kernel.wire import stages
from kernel.wire.codec import Codec
from kernel.wire.stages import Rules
from protocols import fedavg

__all__ = ["ErrorFeedback", "Sent", "fedavg_ef"]


@dataclass
class Sent:
    """Byte counts and residual size of one `ErrorFeedback.compress` call."""

    raw_bytes: int = 0  # float32 bytes of the update
    sent_bytes: int = 0  # after the stages (before lossless compression)
    residual: float = 0.0  # L2 norm of the residual kept, over all tensors


class ErrorFeedback:
    """Per-(node, tensor) residuals for the tensors of `field` in `kind` messages: `compress`
    returns exactly what the receiver will decode and carries the rest to the next call."""

    def __init__(self, rules: Rules, kind: str, field: str, *, seed: int = 0,
                 enabled: bool = True) -> None:
        self.rules = rules
        self.kind = kind
        self.field = field
        self.seed = seed
        self.enabled = enabled  # False: the same stages, no residuals (for comparison)
        self.last = Sent()
        self._residual: dict[tuple[int, str], np.ndarray] = {}
        self._calls: dict[int, int] = {}

    @classmethod
    def from_config(cls, codec_section: Mapping[str, Any], kind: str, field: str,
                    **kw: Any) -> ErrorFeedback:
        """Error feedback under the `[codec]` table's rules (validated as the codec does)."""
        return cls(Codec.from_config(codec_section).rules, kind, field, **kw)

    def compress(self, node: int, update: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """What node `node` should send for `update` (named float arrays): for each tensor that
        a rule names, stages(update + residual) as float32, with the residual updated; other
        tensors as they are. Deterministic in (seed, node, how many calls node made)."""
        calls = self._calls.get(node, 0)
        self._calls[node] = calls + 1
        stats = Sent()
        sq = 0.0
        out: dict[str, np.ndarray] = {}
        for name in sorted(update):
            g = np.asarray(update[name])
            stats.raw_bytes += g.size * 4
            rule = self.rules.match(self.kind, f"{self.field}/{name}", g.size)
            if rule is None or not rule.pipeline.names or g.dtype.kind != "f":
                out[name] = g
                stats.sent_bytes += g.nbytes
                continue
            key = (node, name)
            acc = np.array(g, np.float32)
            if self.enabled and key in self._residual:
                acc += self._residual[key]
            flat = acc.reshape(-1)
            enc = stages.encode(flat, rule.pipeline,
                                functools.partial(np.random.default_rng,
                                                  [self.seed, node, calls, len(out)]))
            if enc is None:  # not representable: the codec sends it losslessly
                sent = acc
                stats.sent_bytes += acc.nbytes
            else:
                sent = stages.decode(flat.size, rule.pipeline, "float32",
                                     enc.sections).reshape(acc.shape)
                stats.sent_bytes += enc.sizes[-1][1]
            if self.enabled:
                res = acc - sent
                self._residual[key] = res
                sq += float(np.dot(res.reshape(-1), res.reshape(-1)))
            out[name] = sent
        stats.residual = sq ** 0.5
        self.last = stats
        return out

    def residual(self, node: int) -> dict[str, np.ndarray]:
        """Node `node`'s residuals by tensor name (empty before its first call)."""
        return {name: r for (n, name), r in sorted(self._residual.items()) if n == node}

    def forget(self, node: int) -> None:
        """Drop node `node`'s residuals (its next call starts from zero)."""
        for key in [k for k in self._residual if k[0] == node]:
            del self._residual[key]
        self._calls.pop(node, None)

    @property
    def nbytes(self) -> int:
        """Bytes of residuals held."""
        return sum(r.nbytes for r in self._residual.values())


# ------------------------------------------------------------------------- FedAvg, with deltas

class _Tap(Context):
    """A node's context as the wrapped protocol sees it: everything passes through to `ctx`
    except the sends that `on_send` rewrites."""

    def __init__(self, ctx: Context, on_send: Any) -> None:
        self.ctx = ctx
        self.on_send = on_send
        self.id = ctx.id
        self.neighbours = ctx.neighbours
        self.n_nodes = ctx.n_nodes
        self.params = ctx.params

    @property
    def now(self) -> float:
        return self.ctx.now

    @property
    def rng(self) -> np.random.Generator:
        return self.ctx.rng

    def send(self, dst: int, kind: str, **body: Any) -> None:
        self.ctx.send(dst, kind, **self.on_send(self.ctx, kind, body))

    def multicast(self, dsts: Iterable[int], kind: str, **body: Any) -> None:
        self.ctx.multicast(dsts, kind, **self.on_send(self.ctx, kind, body))

    def set_timer(self, delay: float, key: Hashable) -> None:
        self.ctx.set_timer(delay, key)

    def cancel_timer(self, key: Hashable) -> None:
        self.ctx.cancel_timer(key)

    def compute(self, work: float = 1.0, label: str = "train") -> float:
        return self.ctx.compute(work, label)

    def emit(self, name: str, value: Any, **fields: Any) -> None:
        self.ctx.emit(name, value, **fields)

    def finish(self, result: Mapping[str, Any]) -> None:
        self.ctx.finish(result)


class _DeltaServer(Protocol):
    """FedAvg's server, fed `update` replies carrying `delta`: it remembers the model it sent
    for the current round and turns each delta back into a model."""

    def __init__(self, inner: Protocol) -> None:
        self.inner = inner
        self.round: Any = None
        self.model: Mapping[str, np.ndarray] = {}

    def _on_send(self, ctx: Context, kind: str, body: dict[str, Any]) -> dict[str, Any]:
        if kind == "train":
            self.round, self.model = body["round"], body["model"]
        return body

    def on_start(self, ctx: Context) -> None:
        self.inner.on_start(_Tap(ctx, self._on_send))

    def on_message(self, ctx: Context, msg: Message) -> None:
        body = msg.body
        if msg.kind == "update" and "delta" in body:
            delta = body["delta"]
            # A reply for another round is discarded by FedAvg (counted late): any model does.
            model = ({k: (self.model[k] + delta[k]).astype(np.float32) for k in sorted(delta)}
                     if body.get("round") == self.round else delta)
            body = {k: v for k, v in body.items() if k != "delta"}
            body["model"] = model
            msg = msg._replace(body=body)
        self.inner.on_message(_Tap(ctx, self._on_send), msg)

    def on_timer(self, ctx: Context, key: Hashable) -> None:
        self.inner.on_timer(_Tap(ctx, self._on_send), key)

    def on_stop(self, ctx: Context) -> None:
        self.inner.on_stop(_Tap(ctx, self._on_send))


class _DeltaClient(Protocol):
    """FedAvg's client, replying with the error-fed delta from the model it received."""

    def __init__(self, inner: Protocol, ef: ErrorFeedback) -> None:
        self.inner = inner
        self.ef = ef

    def on_message(self, ctx: Context, msg: Message) -> None:
        if msg.kind != "train":
            self.inner.on_message(ctx, msg)
            return
        received = msg.body["model"]

        def on_send(ctx: Context, kind: str, body: dict[str, Any]) -> dict[str, Any]:
            if kind != "update" or "model" not in body:
                return body
            body = dict(body)
            model = body.pop("model")
            delta = {k: np.subtract(model[k], received[k], dtype=np.float32)
                     for k in sorted(model)}
            body["delta"] = self.ef.compress(ctx.id, delta)
            s = self.ef.last
            ctx.emit("compression", body.get("round"), raw_bytes=s.raw_bytes,
                     sent_bytes=s.sent_bytes, residual=s.residual)
            return body

        self.inner.on_message(_Tap(ctx, on_send), msg)

    def on_timer(self, ctx: Context, key: Hashable) -> None:
        self.inner.on_timer(ctx, key)


def fedavg_ef(config: Mapping[str, Any]) -> Deployment:
    """FedAvg (protocols.fedavg, unchanged) whose clients send error-fed compressed deltas;
    `[protocol] error_feedback` (default true) turns the residuals off for comparison."""
    proto = dict(config.get("protocol", {}))
    enabled = proto.pop("error_feedback", True)
    if not isinstance(enabled, bool):
        raise ConfigError(f"[protocol] error_feedback = {enabled!r}; expected true or false")
    proto["name"] = "fedavg"
    dep = fedavg.build({**config, "protocol": proto})
    seed = int(config.get("run", {}).get("seed", 0))
    ef = ErrorFeedback.from_config(config.get("codec", {}), "update", "delta", seed=seed,
                                   enabled=enabled)
    inner = dep.make_node

    def make_node(i: int) -> Protocol:
        return _DeltaServer(inner(0)) if i == 0 else _DeltaClient(inner(i), ef)

    return Deployment(node_ids=dep.node_ids, make_node=make_node, neighbours=dep.neighbours,
                      params=dep.params,
                      describe=f"{dep.describe}; clients send error-fed deltas",
                      prepare=dep.prepare)


fedavg_ef.honours = fedavg.build.honours  # type: ignore[attr-defined]

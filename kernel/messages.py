"""The message: the one thing nodes exchange."""

from __future__ import annotations

from typing import Any, NamedTuple


class Message(NamedTuple):
    """An immutable message from node `src` to node `dst`; `body` holds scalars, str, bytes,
    numpy arrays, torch tensors and lists or dicts of them."""

    src: int
    dst: int
    kind: str
    body: dict[str, Any]
    sent_at: float
    # Per-sender sequence number: with `src` it names a message uniquely and orders ties.
    seq: int = 0

    def __getattr__(self, name: str) -> Any:
        # `msg.model` reads `msg.body["model"]`: protocols stay short without a second API.
        try:
            return self.body[name]
        except KeyError:
            raise AttributeError(
                f"message kind {self.kind!r} from node {self.src} has no field {name!r}; "
                f"its body has {sorted(self.body)}"
            ) from None

"""fedloom's kernel: node API, messages, event loop and clocks, codec, config and runner.

The kernel imports no transport and no protocol; it finds them by name through `kernel.registry`.
"""

from kernel.api import Context, Deployment, Network, Protocol
from kernel.messages import Message

__all__ = ["Context", "Deployment", "Message", "Network", "Protocol"]

"""Python clients of the manylora router, blocking and asyncio.

from services.client import ManyloraClient
with ManyloraClient("127.0.0.1:50050") as client:
    for chunk in client.generate("Hello", adapter="my-adapter", max_new_tokens=32):
        print(chunk.text, end="", flush=True)

Where the router requires a token or TLS:
ManyloraClient("router:50050", token=TOKEN, tls=ClientTls(ca_file="ca.pem")).
"""

from services.client.async_client import AsyncManyloraClient
from services.client.messages import Chunk, Completion, ManyloraError, Usage
from services.client.sync_client import ManyloraClient
from services.common.tls import ClientTls

__all__ = [
    "AsyncManyloraClient",
    "Chunk",
    "ClientTls",
    "Completion",
    "ManyloraClient",
    "ManyloraError",
    "Usage",
]

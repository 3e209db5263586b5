"""Python clients of the manylora router, blocking and asyncio.

from services.client import ManyloraClient
with ManyloraClient("127.0.0.1:50050") as client:
    for chunk in client.generate("Hello", adapter="my-adapter", max_new_tokens=32):
        print(chunk.text, end="", flush=True)
"""

from services.client.async_client import AsyncManyloraClient
from services.client.messages import Chunk, Completion, ManyloraError, Usage
from services.client.sync_client import ManyloraClient

__all__ = ["AsyncManyloraClient", "Chunk", "Completion", "ManyloraClient", "ManyloraError", "Usage"]

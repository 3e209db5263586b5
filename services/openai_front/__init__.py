"""The OpenAI-compatible HTTP front: `POST /v1/completions`, `POST /v1/chat/completions`
(streamed as server-sent events or whole) and `GET /v1/models`, mapped onto the router's
gRPC API, so that backends written for vLLM, LoRAX or SGLang can call manylora unchanged.

Its own small service beside the router rather than a second listener of it: it reaches the
router only through the public `manylora.v1.Router` API, like any other client, so the router
stays one gRPC program without an HTTP stack, and the fronts scale, restart and fail apart
from the routers (a front holds no state either). The price is one more gRPC hop on the same
host or network; benchmarks/openai_front_bench.py measures what it costs. `make run` and tests
start it inside their own process with `start_openai_front`.
"""

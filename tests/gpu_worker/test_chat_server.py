"""Chat prompts through a worker's gRPC API: a conversation is rendered with the model folder's
chat template and generates exactly what the token ids of HF's `apply_chat_template` generate;
conversations the boundary or the template refuse are INVALID_ARGUMENT, the request's own."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from transformers import AutoTokenizer

from manylora.v1 import common_pb2, gpu_worker_pb2_grpc
from services.common.errors import FAILURE_SCOPE_KEY, REQUEST_FAILURE
from services.gpu_worker.serving.config import WorkerConfig
from services.gpu_worker.serving.server import start_worker
from tests.gpu_worker.chat_folder import LLAMA2_LIKE, as_dicts, chat, model_folder, save_tiny_llama

CONVERSATION = chat(
    ("system", "be brief"), ("user", "the quick fox?"), ("assistant", "lazy."), ("user", "dog?")
)
NEW_TOKENS = 8


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_llama(model_folder(tmp_path_factory.mktemp("chat"), LLAMA2_LIKE, False))


@pytest.fixture
async def stub(folder: Path) -> AsyncIterator[gpu_worker_pb2_grpc.GpuWorkerStub]:
    worker = await start_worker(
        WorkerConfig(port=0, device="cpu", model=str(folder), dummy=False, pool_slots=1024)
    )
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{worker.port}") as channel:
            yield gpu_worker_pb2_grpc.GpuWorkerStub(channel)
    finally:
        await worker.stop()


def params() -> common_pb2.SamplingParams:
    return common_pb2.SamplingParams(max_new_tokens=NEW_TOKENS, ignore_eos=True)


async def generated(stub, request: common_pb2.GenerateRequest) -> tuple[list[int], int]:
    responses = [r async for r in stub.Generate(request, timeout=30)]
    return [t for r in responses for t in r.token_ids], responses[-1].usage.prompt_tokens


async def test_chat_generates_what_apply_chat_template_ids_generate(stub, folder: Path):
    hf_ids = AutoTokenizer.from_pretrained(str(folder)).apply_chat_template(
        as_dicts(CONVERSATION), tokenize=True, add_generation_prompt=True, return_dict=False
    )
    assert isinstance(hf_ids, list)
    ids = [i for i in hf_ids if isinstance(i, int)]
    assert len(ids) == len(hf_ids)
    by_ids = common_pb2.GenerateRequest(
        prompt_token_ids=common_pb2.PromptTokenIds(ids=ids), params=params()
    )
    by_chat = common_pb2.GenerateRequest(
        chat=common_pb2.ChatPrompt(messages=CONVERSATION), params=params()
    )
    expected, expected_prompt_tokens = await generated(stub, by_ids)
    got, prompt_tokens = await generated(stub, by_chat)
    assert prompt_tokens == expected_prompt_tokens == len(ids)
    assert got == expected and len(got) == NEW_TOKENS


@pytest.mark.parametrize(
    ("messages", "needle"),
    [
        (chat(("user", "a"), ("user", "b")), "roles must alternate"),  # the template's refusal
        (chat(("user", "a"), ("tool", "b")), "role 'tool'"),  # the boundary's
        (chat(), "chat.messages is empty"),
    ],
)
async def test_refused_conversations_are_the_requests_failure(stub, messages, needle):
    request = common_pb2.GenerateRequest(
        chat=common_pb2.ChatPrompt(messages=messages), params=params()
    )
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await generated(stub, request)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert needle in (err.value.details() or "")
    if needle == "roles must alternate":  # refused past the boundary: marked as the request's
        assert (FAILURE_SCOPE_KEY, REQUEST_FAILURE) in tuple(err.value.trailing_metadata() or ())

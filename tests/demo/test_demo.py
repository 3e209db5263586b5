"""`make run`'s demo: its trained adapters go through the real path (PEFT folders uploaded to
the store, fetched and served by the worker, streamed by the router), each answers the way
it was trained to, and every model's answer differs from every other's. HF transformers +
PEFT, loading the same folders, are the independent oracle of what the stack serves."""

from __future__ import annotations

import itertools

import pytest
import torch

from demo.__main__ import main
from demo.artifacts import DemoModels
from demo.behaviours import ADAPTER_BEHAVIOURS, BASE_BEHAVIOUR, DEMO_PROMPTS, prompt_of
from demo.stack import running_stack
from demo.training import BOS, EOS, encode
from services.client import AsyncManyloraClient
from services.gpu_worker.engine.tokenizer import ByteTokenizer


def test_the_demo_streams_every_answer_as_trained(demo_models: DemoModels, capsys):
    status = main(["--cache-dir", str(demo_models.model_dir.parent.parent)])
    out = capsys.readouterr().out
    assert status == 0, out
    lines = out.splitlines()
    models = [("base model", BASE_BEHAVIOUR), *ADAPTER_BEHAVIOURS.items()]
    fronts = ("gRPC", "the OpenAI API")
    for text in DEMO_PROMPTS:
        for front in fronts:  # each front's block: its header, then one line per model
            start = lines.index(f"{text!r} via {front}:") + 1
            block = lines[start : start + len(models)]
            for line, (model, behaviour) in zip(block, models, strict=True):
                assert line.startswith(f"  {model:<10}  {behaviour(text)} "), line
                assert line.endswith("✓"), line
    count = len(DEMO_PROMPTS) * len(models) * len(fronts)
    assert f"{count} of {count} answers as trained" in out


def hf_greedy(model: torch.nn.Module, text: str, max_new_tokens: int = 64) -> str:
    """Greedy answer computed by HF one token at a time, decoded as the worker's tokenizer."""
    ids = [BOS, *encode(prompt_of(text))]
    out: list[int] = []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            logits = model(input_ids=torch.tensor([ids + out])).logits
            token = int(logits[0, -1].argmax())
            if token == EOS:
                break
            out.append(token)
    return ByteTokenizer().decode(out)


@pytest.fixture(scope="module")
def hf_answers(demo_models: DemoModels) -> dict[tuple[str, str], str]:
    """{(adapter or "", text): HF + PEFT's greedy answer} from the demo's folders."""
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    answers = {}
    base = LlamaForCausalLM.from_pretrained(demo_models.model_dir).eval()
    for text in DEMO_PROMPTS:
        answers["", text] = hf_greedy(base, text)
    for name, folder in demo_models.adapter_dirs.items():
        fresh = LlamaForCausalLM.from_pretrained(demo_models.model_dir)
        peft_model = PeftModel.from_pretrained(fresh, folder).eval()
        for text in DEMO_PROMPTS:
            answers[name, text] = hf_greedy(peft_model, text)
    return answers


async def test_served_adapters_answer_as_trained_and_as_peft_does(
    demo_models: DemoModels, hf_answers, tmp_path
):
    behaviours = {"": BASE_BEHAVIOUR, **ADAPTER_BEHAVIOURS}
    async with (
        running_stack(demo_models, tmp_path) as stack,
        AsyncManyloraClient(stack.router, timeout=60) as client,
    ):
        assert sorted(info.adapter_id for info in await client.list_adapters()) == sorted(
            ADAPTER_BEHAVIOURS
        )
        for text in DEMO_PROMPTS:
            served = {}
            for model, behaviour in behaviours.items():
                done = await client.complete(prompt_of(text), adapter=model, max_new_tokens=64)
                assert done.adapter_version == (1 if model else 0)  # the store's upload
                assert done.finish_reason == "eos"  # it ended its answer itself
                assert done.text == behaviour(text) == hf_answers[model, text], (model, text)
                served[model] = done.text
            for a, b in itertools.combinations(served, 2):
                assert served[a] != served[b], (a, b, text)

"""`make run`'s demo: the whole stack starts, lists the uploaded adapters and streams
completions for two adapters and the base model, then stops."""

from __future__ import annotations

from services.router import demo


async def test_demo_streams_through_the_whole_stack(capsys):
    await demo.main([])
    out = capsys.readouterr().out
    assert "the router lists: demo-rank16, demo-rank32, demo-rank8" in out
    for adapter in ("demo-rank8", "demo-rank32", "base model"):
        assert f"[{adapter}] {demo.PROMPT}" in out
    assert out.count("-> 48 tokens, finish length") == 3

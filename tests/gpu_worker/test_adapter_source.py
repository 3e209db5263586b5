"""`--adapters` folders at start-up: a bad folder is skipped with one warning, the rest serve,
each as version 1 with the sha256 of its canonical bytes."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from services.common.base_model import BaseModelShape, load_hf_config
from services.common.errors import NotFound
from services.common.peft_adapter import CONFIG_FILE
from services.gpu_worker.adapters.adapter_source import (
    LocalFolderAdapterSource,
    parse_adapter_paths,
)
from tests.adapter_store.helpers import make_peft_adapter

TINY = BaseModelShape.from_hf_config(load_hf_config("tiny"))


async def test_bad_folders_are_skipped_with_one_warning_each(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    make_peft_adapter(tmp_path / "good", seed=1)
    make_peft_adapter(tmp_path / "other", seed=4)
    make_peft_adapter(tmp_path / "broken", seed=2)
    (tmp_path / "broken" / CONFIG_FILE).write_text("{not json")
    make_peft_adapter(tmp_path / "dora", seed=3, use_dora=True)
    missing = tmp_path / "missing"
    specs = [
        str(tmp_path / "good"),
        str(tmp_path / "broken"),
        f"m={tmp_path / 'dora'}",
        str(tmp_path / "other"),
    ]
    with caplog.at_level(logging.WARNING):
        source = LocalFolderAdapterSource(
            parse_adapter_paths([*specs, str(missing)]), TINY, max_rank=64
        )

    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 3, [r.getMessage() for r in warnings]
    for record, (folder, why) in zip(
        warnings,
        [("broken", "JSON"), ("dora", "use_dora"), ("missing", "missing")],
        strict=True,
    ):
        message = record.getMessage()
        assert str(tmp_path / folder) in message and why in message, message
        assert record.exc_info is None  # one line, no traceback
    assert source.cached_ids() == ["good", "other"]

    good, other = await source.get("good"), await source.get("other")
    assert good.version == other.version == 1
    assert len(good.sha256) == 64 and int(good.sha256, 16) >= 0
    assert good.sha256 != other.sha256  # a digest of the weights, not of nothing
    assert good.key == ("good", 1, good.sha256)
    assert await source.get("good", 1) is good
    for adapter_id, version in (("good", 2), ("broken", 0), ("m", 0)):
        with pytest.raises(NotFound):
            await source.get(adapter_id, version)


async def test_folders_are_kept_in_the_engines_dtype_under_the_files_identity(
    tmp_path: Path,
) -> None:
    make_peft_adapter(tmp_path / "good", seed=1)
    paths = parse_adapter_paths([str(tmp_path / "good")])
    as_files = await LocalFolderAdapterSource(paths, TINY, max_rank=64).get("good")
    kept = await LocalFolderAdapterSource(paths, TINY, 64, torch.bfloat16).get("good")
    assert as_files.dtype_name == "float32" and kept.dtype_name == "bfloat16"
    assert kept.key == as_files.key
    for proj in as_files.target_modules:
        assert torch.equal(kept.lora_a[proj], as_files.lora_a[proj].to(torch.bfloat16))
        assert torch.equal(kept.lora_b[proj], as_files.lora_b[proj].to(torch.bfloat16))

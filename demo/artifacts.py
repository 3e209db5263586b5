"""The demo's trained models, cached on disk so that only the first run trains.

`.demo/<key>/model/` is a Hugging Face folder (config.json, model.safetensors, a byte-level
tokenizer.json) and `.demo/<key>/adapters/<name>/` a PEFT folder per adapter. The key hashes
everything training depends on, so a changed recipe trains anew instead of reusing stale
weights. Each folder is written under a temporary name and renamed into place when complete:
an interrupted run leaves at most a `.tmp-*` folder that nothing reads, never a half model.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer, decoders, processors
from tokenizers.models import BPE

from demo import training
from demo.behaviours import ADAPTER_BEHAVIOURS, BASE_BEHAVIOUR, DEMO_PROMPTS, WORDS

CACHE_ENV = "MANYLORA_DEMO_CACHE"
# Bump when training changes in a way the key below does not see.
RECIPE_VERSION = 1
# Answers to this text stand for the behaviours' code in the key.
_PROBE = "Hello, World 42!"

Progress = Callable[[str, training.TrainReport], None]


@dataclass(frozen=True)
class DemoModels:
    model_dir: Path
    adapter_dirs: dict[str, Path]


def default_cache_dir() -> Path:
    """`$MANYLORA_DEMO_CACHE`, else `.demo/` at the repository root (git-ignored)."""
    return Path(os.environ.get(CACHE_ENV) or Path(__file__).resolve().parent.parent / ".demo")


def recipe_key() -> str:
    recipe = {
        "version": RECIPE_VERSION,
        "model": training.MODEL_CONFIG,
        "lora_rank": training.LORA_RANK,
        "base": dataclasses.asdict(training.BASE_SCHEDULE),
        "adapter": dataclasses.asdict(training.ADAPTER_SCHEDULE),
        "stop": [
            training.CHECK_EVERY,
            training.HELD_OUT,
            training.HELD_OUT_ACCURACY,
            training.MIN_MARGIN,
        ],
        "words": WORDS,
        "prompts": DEMO_PROMPTS,
        "behaviours": {
            name: behaviour(_PROBE)
            for name, behaviour in [("", BASE_BEHAVIOUR), *ADAPTER_BEHAVIOURS.items()]
        },
    }
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:12]


def write_atomically(final: Path, write: Callable[[Path], None]) -> None:
    """Run `write(folder)` on a fresh temporary folder beside `final`, then rename it to
    `final`. When another run got there first, its folder is kept and ours dropped."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=final.parent))
    try:
        write(tmp)
        try:
            tmp.rename(final)
        except OSError:
            if not final.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_byte_tokenizer(folder: Path) -> None:
    """tokenizer.json mapping text to the ids the model was trained on: <s> first, then one id
    per UTF-8 byte (byte b is id b + 3), as the worker's ByteTokenizer does; decoding skips
    the specials (and, as in Llama's tokenizers, the text "<s>" is the special token). A BPE
    without merges whose vocabulary holds only byte tokens encodes every character through its
    byte fallback."""
    vocab = {"<pad>": training.PAD, "<s>": training.BOS, "</s>": training.EOS}
    vocab |= {f"<0x{b:02X}>": b + training.BYTE_OFFSET for b in range(256)}
    tokenizer = Tokenizer(BPE(vocab=vocab, merges=[], byte_fallback=True))
    tokenizer.add_special_tokens(["<pad>", "<s>", "</s>"])
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", training.BOS)]
    )
    tokenizer.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Fuse()])
    tokenizer.save(str(folder / "tokenizer.json"))
    config = {
        "add_bos_token": True,
        "bos_token": "<s>",
        "eos_token": "</s>",
        "pad_token": "<pad>",
        # A chat is answered as a prompt: the last user message, then the newline.
        "chat_template": "{{ messages[-1]['content'] }}\n",
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))


def ensure_models(cache_dir: Path, on_trained: Progress | None = None) -> DemoModels:
    """The demo's model and adapters, trained and written first where the cache lacks them."""
    root = cache_dir / recipe_key()
    trained = DemoModels(
        root / "model", {name: root / "adapters" / name for name in ADAPTER_BEHAVIOURS}
    )

    def write_base(folder: Path) -> None:
        report = training.train_base(folder, BASE_BEHAVIOUR)
        write_byte_tokenizer(folder)
        if on_trained is not None:
            on_trained("base model", report)

    if not trained.model_dir.is_dir():
        write_atomically(trained.model_dir, write_base)
    for name, folder in trained.adapter_dirs.items():
        if folder.is_dir():
            continue

        def write_adapter(tmp: Path, name: str = name) -> None:
            report = training.train_adapter(trained.model_dir, tmp, ADAPTER_BEHAVIOURS[name])
            if on_trained is not None:
                on_trained(name, report)

        write_atomically(folder, write_adapter)
    return trained

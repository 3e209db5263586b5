"""Random LoRA adapters for serving benchmarks, in memory or as PEFT folders.

Thousands of Llama-7B adapters do not fit in host memory (a rank-64 one is 128 MiB in bf16),
so a benchmark's adapters draw their weights from a small bank: `distinct` weight sets per
rank, shared by the adapters of that rank. Each adapter is still its own object with its own
id, so the engine loads, caches and evicts it as a separate adapter; only the numbers in it
repeat, which no timing depends on.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from services.common.base_model import LINEAR_MODULES, TARGET_MODULES, BaseModelShape
from services.common.lora_format import CanonicalAdapter
from services.common.random_adapters import save_random_peft_adapter

# Small weights keep activations in range, as a trained adapter's would be.
WEIGHT_STD = 1 / 64
# Named sets of target modules a benchmark's adapters may take (`--target-modules`).
TARGET_SETS = {"attention": TARGET_MODULES, "all-linear": LINEAR_MODULES}


def parse_targets(text: str) -> tuple[str, ...]:
    """`attention` (q/k/v/o), `all-linear` (those and gate/up/down), or a comma list of them."""
    if text in TARGET_SETS:
        return TARGET_SETS[text]
    names = tuple(name for name in text.split(",") if name)
    unknown = sorted(set(names) - set(LINEAR_MODULES))
    if unknown or not names:
        raise ValueError(
            f"target modules {text!r}: use {', '.join(TARGET_SETS)} or names among "
            f"{', '.join(LINEAR_MODULES)}"
        )
    return names


def targets_label(targets: Sequence[str]) -> str:
    """The name of a target set for result rows (its TARGET_SETS key when it has one)."""
    for name, members in TARGET_SETS.items():
        if tuple(targets) == members:
            return name
    return ",".join(targets)


def random_canonical_adapter(
    shape: BaseModelShape,
    rank: int,
    seed: int,
    dtype: torch.dtype,
    device: torch.device,
    adapter_id: str = "",
    base_model: str = "",
    targets: Sequence[str] = TARGET_MODULES,
) -> CanonicalAdapter:
    """A canonical adapter (A [L, r, in], B [L, out, r] per target projection) with seeded
    random weights, drawn on `device` (fast for 7B shapes on a GPU) and kept there."""
    gen = torch.Generator(device).manual_seed(seed)
    adapter = CanonicalAdapter(adapter_id or f"random-{seed}", rank, 2.0 * rank, 2.0, base_model)
    for proj in targets:
        in_f, out_f = shape.proj_dims(proj)
        a = torch.randn(shape.num_layers, rank, in_f, generator=gen, device=device)
        b = torch.randn(shape.num_layers, out_f, rank, generator=gen, device=device)
        adapter.lora_a[proj] = (a * WEIGHT_STD).to(dtype)
        adapter.lora_b[proj] = (b * WEIGHT_STD).to(dtype)
    return adapter


class AdapterBank:
    """Adapter i of rank `rank_of(i)` as a CanonicalAdapter on the host; one object per i,
    since the engine's residency cache knows an adapter by its identity."""

    def __init__(
        self,
        shape: BaseModelShape,
        rank_of: Callable[[int], int],
        dtype: torch.dtype,
        draw_device: torch.device,
        distinct: int = 8,
        seed: int = 0,
        targets: Sequence[str] = TARGET_MODULES,
    ):
        self.shape, self.rank_of, self.dtype = shape, rank_of, dtype
        self.draw_device, self.distinct, self.seed = draw_device, distinct, seed
        self.targets = tuple(targets)
        self._weights: dict[tuple[int, int], CanonicalAdapter] = {}
        self._adapters: dict[int, CanonicalAdapter] = {}

    def _weight_set(self, rank: int, slot: int) -> CanonicalAdapter:
        key = (rank, slot)
        if key not in self._weights:
            seed = self.seed * 1_000_003 + rank * 1009 + slot
            drawn = random_canonical_adapter(
                self.shape, rank, seed, self.dtype, self.draw_device, targets=self.targets
            )
            self._weights[key] = drawn.to("cpu", self.dtype)
        return self._weights[key]

    def adapter(self, index: int, adapter_id: str) -> CanonicalAdapter:
        if index not in self._adapters:
            rank = self.rank_of(index)
            weights = self._weight_set(rank, index % self.distinct)
            self._adapters[index] = CanonicalAdapter(
                adapter_id,
                rank,
                weights.alpha,
                weights.scaling,
                weights.base_model,
                lora_a=dict(weights.lora_a),
                lora_b=dict(weights.lora_b),
            )
        return self._adapters[index]


def write_peft_bank(
    folder: Path,
    shape: BaseModelShape,
    ranks: tuple[int, ...],
    distinct: int,
    seed: int = 0,
    targets: Sequence[str] = TARGET_MODULES,
) -> dict[tuple[int, int], Path]:
    """PEFT folders for `distinct` weight sets per rank, keyed by (rank, set); uploading one
    folder under many ids gives the store as many adapters for the cost of writing one."""
    paths: dict[tuple[int, int], Path] = {}
    for rank in sorted(set(ranks)):
        for slot in range(distinct):
            path = folder / f"rank{rank}-set{slot}"
            paths[(rank, slot)] = save_random_peft_adapter(
                path, shape, rank, seed=seed * 1_000_003 + rank * 1009 + slot, targets=targets
            )
    return paths

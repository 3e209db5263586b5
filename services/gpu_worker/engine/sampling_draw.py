"""How `sampling.sample` draws a batch's rows (its contract: sampling.py's docstring): the
rows' options as arrays (`plan_rows`), their logits on the device (`device_rows`), integer
weights, the kept prefix of a row with top-k or top-p in canonical order (`kept_prefix`), and
the inverse-CDF draws over it (`draw_filtered`) or over the token ids (`draw_unfiltered`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from services.gpu_worker.memory.queued_copy import queued_to_device

if TYPE_CHECKING:
    from services.gpu_worker.engine.sampling import SamplingOptions

# Colder than this is greedy up to exact ties; clamping keeps (logit - max) / temperature
# finite whatever the caller sends (1e-45 would overflow float32 to -inf - -inf = NaN).
MIN_TEMPERATURE = 1e-4
# Hotter than this is uniform over the kept tokens anyway; the cap keeps it a float32.
MAX_TEMPERATURE = 3e38
# A top-p row without top-k first looks for its nucleus among this many best tokens; only
# when the nucleus is longer is its whole row sorted.
NUCLEUS_WIDTH = 1024


@dataclass
class RowPlan:
    """Per-row options as arrays, and which rows go which way (host side, no device work)."""

    temperature: np.ndarray  # float64, clamped to [MIN_TEMPERATURE, MAX_TEMPERATURE]
    top_k: np.ndarray  # int64 in [1, V]; V = off
    top_p: np.ndarray  # float64 in (0, 1]; 1 = off
    filtered: np.ndarray  # row indices: sampled with top-k or top-p
    unfiltered: np.ndarray  # row indices: sampled without filters
    invalid: dict[int, str]  # row -> why its options cannot be sampled


def plan_rows(options: Sequence[SamplingOptions], vocab: int) -> RowPlan:
    count = len(options)
    temperature = np.fromiter([o.temperature for o in options], np.float64, count)
    top_p = np.fromiter([o.top_p for o in options], np.float64, count)
    try:
        top_k = np.fromiter([o.top_k for o in options], np.int64, count)
    except OverflowError:  # options built without from_proto may hold any int
        top_k = np.fromiter([max(min(o.top_k, vocab), -1) for o in options], np.int64, count)
    sampled = temperature != 0.0  # NaN too: it is refused below, not greedy
    with np.errstate(invalid="ignore"):
        checks = (
            (~np.isfinite(temperature) | (temperature < 0), "temperature must be finite, >= 0"),
            (top_k < 0, "top_k must be >= 0"),
            (~(top_p > 0), "top_p must be > 0"),  # NaN included
        )
    invalid: dict[int, str] = {}
    for bad, why in checks:
        for row in np.flatnonzero(sampled & bad).tolist():
            invalid.setdefault(row, why)
    good = sampled.copy()
    good[list(invalid)] = False
    top_k = np.where((top_k <= 0) | (top_k >= vocab), vocab, top_k)
    top_p = np.where(top_p >= 1.0, 1.0, top_p)
    has_filter = (top_k < vocab) | (top_p < 1.0)
    return RowPlan(
        temperature=np.clip(np.nan_to_num(temperature), MIN_TEMPERATURE, MAX_TEMPERATURE),
        top_k=top_k,
        top_p=top_p,
        filtered=np.flatnonzero(good & has_filter),
        unfiltered=np.flatnonzero(good & ~has_filter),
        invalid=invalid,
    )


def weight_shift(vocab: int) -> int:
    """Bits of a token's integer weight: the argmax weighs 2**shift, and a row's total
    (at most vocab * 2**shift) stays under 2**53, where float64 holds every integer."""
    return 53 - vocab.bit_length()


def integer_weights(
    x: torch.Tensor, row_max: torch.Tensor, temp: torch.Tensor, shift: int
) -> torch.Tensor:
    """Integer weights floor(exp((x - max) / T) * 2**shift) of x [S, W] (int64). The scaled
    logits are <= 0 with a 0 at the max, so exp is in [0, 1] at any temperature."""
    scaled = (x - row_max[:, None]) / temp[:, None]
    return torch.exp(scaled).mul_(float(2**shift)).to(torch.int64)


@dataclass
class DeviceRows:
    """One pass's rows on the device: finite logits and their options."""

    logits: torch.Tensor  # [S, V] float32; rows with non-finite logits replaced by zeros
    row_max: torch.Tensor  # [S] float32
    temp: torch.Tensor  # [S] float32
    top_k: torch.Tensor  # [S] int64
    top_p: torch.Tensor  # [S] float64
    u: torch.Tensor  # [S] float64


@dataclass
class KeptPrefix:
    """A row's best tokens in canonical order and the running sums of their weights."""

    values: torch.Tensor  # [S, W] the W largest logits, descending
    sums: torch.Tensor  # [S, W] int64 inclusive running sums of weights, over the top k only
    kept: torch.Tensor  # [S] int64 in [1, min(k, W)]: tokens that top-k and top-p keep


@dataclass(frozen=True)
class FilterShape:
    """What the host knows of a filtered pass's rows, which sizes its tensors."""

    top_k_max: int  # the largest top-k under V among the rows (1 if none)
    top_p: bool  # some row has top-p
    nucleus: bool  # some row has top-p without top-k
    shift: int  # see _weight_shift


def kept_prefix(rows: DeviceRows, shape: FilterShape) -> KeptPrefix:
    """The kept prefix of each filtered row."""
    vocab = rows.logits.shape[1]
    width = min(vocab, max(shape.top_k_max, NUCLEUS_WIDTH if shape.nucleus else 1))
    while True:
        if width < vocab:
            values = torch.topk(rows.logits, width, dim=-1).values
        else:
            values = torch.sort(rows.logits, dim=-1, descending=True).values
        in_top_k = torch.arange(width, device=values.device)[None, :] < rows.top_k[:, None]
        weights = integer_weights(values, rows.row_max, rows.temp, shape.shift)
        weights.masked_fill_(~in_top_k, 0)
        sums = torch.cumsum(weights, dim=-1)
        kept = torch.clamp(rows.top_k, max=width)
        if not shape.top_p:
            return KeptPrefix(values, sums, kept)
        # The total that top-p takes its share of: the top k's weights. A row whose top k
        # is longer than the width needs its whole row's.
        total = sums[:, -1]
        if shape.nucleus and width < vocab:
            whole = integer_weights(rows.logits, rows.row_max, rows.temp, shape.shift).sum(dim=-1)
            total = torch.where(rows.top_k > width, whole, total)
        before = (sums - weights).to(torch.float64)
        in_nucleus = in_top_k & (before < (rows.top_p * total.to(torch.float64))[:, None])
        nucleus = in_nucleus.sum(dim=-1).clamp_(min=1)
        kept = torch.where(rows.top_p < 1.0, nucleus, kept)
        if width == vocab or not shape.nucleus:
            return KeptPrefix(values, sums, kept)
        # A nucleus that fills the width may go on past it: sort the whole rows (exact
        # either way, so the rows that did fit get the same answer).
        if not bool(((rows.top_k > width) & (rows.top_p < 1.0) & (nucleus >= width)).any()):
            return KeptPrefix(values, sums, kept)
        width = vocab


def draw_filtered(rows: DeviceRows, shape: FilterShape) -> torch.Tensor:
    """Tokens [S] of rows with top-k or top-p, by inverse CDF over their kept prefix."""
    prefix = kept_prefix(rows, shape)
    width = prefix.values.shape[1]
    total = prefix.sums.gather(1, (prefix.kept - 1)[:, None])  # [S, 1], >= 2**shift
    target = torch.minimum(torch.floor(rows.u[:, None] * total.to(torch.float64)).long(), total - 1)
    # First position whose running sum exceeds the target: a position inside the prefix.
    position = torch.searchsorted(prefix.sums, target, right=True).clamp_(max=width - 1)
    value = prefix.values.gather(1, position)  # [S, 1]
    # The drawn position is tie number `rank` (0-based) among the tokens with its logit,
    # which the canonical order takes by token id; every larger logit is among the W.
    rank = position[:, 0] - (prefix.values > value).sum(dim=-1)
    ties = torch.cumsum(rows.logits == value, dim=-1, dtype=torch.int32)
    token = torch.searchsorted(ties, (rank + 1).to(torch.int32)[:, None])
    return token[:, 0].clamp_(max=rows.logits.shape[1] - 1)


def draw_unfiltered(rows: DeviceRows, shift: int) -> torch.Tensor:
    """Tokens [S] of rows without filters, by inverse CDF over the token ids."""
    sums = torch.cumsum(integer_weights(rows.logits, rows.row_max, rows.temp, shift), dim=-1)
    total = sums[:, -1:]
    target = torch.minimum(torch.floor(rows.u[:, None] * total.to(torch.float64)).long(), total - 1)
    token = torch.searchsorted(sums, target, right=True)
    return token[:, 0].clamp_(max=rows.logits.shape[1] - 1)


def filter_shape(plan: RowPlan, group: np.ndarray, vocab: int) -> FilterShape:
    top_k, top_p = plan.top_k[group], plan.top_p[group]
    limited = top_k[top_k < vocab]
    return FilterShape(
        top_k_max=int(limited.max()) if limited.size else 1,
        top_p=bool((top_p < 1.0).any()),
        nucleus=bool(((top_p < 1.0) & (top_k >= vocab)).any()),
        shift=weight_shift(vocab),
    )


def device_rows(
    logits: torch.Tensor,
    row_max: torch.Tensor,
    finite: torch.Tensor,
    plan: RowPlan,
    group: np.ndarray,
    u: np.ndarray,
) -> tuple[DeviceRows, torch.Tensor]:
    """The rows `group` (ascending) of the batch on the device, and their indices there."""
    # One copy to the device for the group's options, uniforms and row indices (all exact
    # in float64: top-k and row indices are far under 2**53).
    table = np.stack(
        [plan.temperature[group], plan.top_k[group], plan.top_p[group], u, group], axis=1
    )
    options = queued_to_device(torch.from_numpy(table), logits.device)
    index = options[:, 4].long()
    if group.size == logits.shape[0]:  # the whole batch, in order: no gather
        x, x_max, ok = logits, row_max, finite
    else:
        x, x_max, ok = (t.index_select(0, index) for t in (logits, row_max, finite))
    # A non-finite row samples zeros instead (its result is discarded): its own NaN must not
    # reach the integer weights or the indices.
    rows = DeviceRows(
        logits=torch.where(ok[:, None], x, 0.0),
        row_max=torch.where(ok, x_max, 0.0),
        temp=options[:, 0].float(),
        top_k=options[:, 1].long(),
        top_p=options[:, 2],
        u=options[:, 3],
    )
    return rows, index

"""Per-row sampling and stopping for batched ``model.generate`` calls.

transformers samples a whole batch with one set of settings from the global RNG. Rows here carry
their own temperature, top-p, top-k, min-p and seed: the processor below draws each row's next
token from its own filtered distribution with a uniform number from the row's own generator
(inverse-CDF sampling), and hands ``generate`` -- which runs in greedy mode -- logits that allow
only that token. A row's tokens then depend on its own seed only, not on which other requests
shared its batch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import cast

import torch
from transformers import LogitsProcessor, StoppingCriteria

# Filtering looks at this many most likely tokens first (a partial sort is far cheaper than a full
# one over a 50k-260k vocabulary); rows whose kept set may reach beyond them are redone in full.
_CANDIDATES = 512


@dataclass(frozen=True)
class RowSampling:
    """Sampling settings of one row; ``temperature <= 0`` means greedy."""

    temperature: float
    top_p: float = 1.0
    top_k: int | None = None
    min_p: float = 0.0
    seed: int = 0

    @property
    def greedy(self) -> bool:
        """Whether the row takes the most likely token."""
        return self.temperature <= 0.0

    @property
    def filters(self) -> bool:
        """Whether the row cuts its distribution (top-p, top-k or min-p)."""
        return self.top_p < 1.0 or (self.top_k or 0) > 0 or self.min_p > 0.0


class RowSampler(LogitsProcessor):
    """Draws each sampled row's token; see the module docstring. Greedy rows pass through."""

    def __init__(self, rows: Sequence[RowSampling], device: torch.device) -> None:
        self.rows = list(rows)
        self.sampled = [i for i, row in enumerate(self.rows) if not row.greedy]
        self.generators = [torch.Generator(device="cpu").manual_seed(self.rows[i].seed % (2**63)) for i in self.sampled]
        sampled_rows = [self.rows[i] for i in self.sampled]
        filtered = [j for j, row in enumerate(sampled_rows) if row.filters]
        plain = [j for j, row in enumerate(sampled_rows) if not row.filters]
        greedy = [i for i, row in enumerate(self.rows) if row.greedy]
        self.settings = [sampled_rows[j] for j in filtered]
        # Index tensors are built once: rebuilding them every step would copy to the device every step.
        self.temperature = torch.tensor([row.temperature for row in sampled_rows], device=device).unsqueeze(1)
        self.index = torch.tensor(self.sampled, device=device, dtype=torch.long)
        self.filtered = torch.tensor(filtered, device=device, dtype=torch.long) if filtered else None
        self.plain = torch.tensor(plain, device=device, dtype=torch.long) if plain else None
        self.greedy = torch.tensor(greedy, device=device, dtype=torch.long) if greedy else None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if not self.sampled:
            return scores
        probs = (scores.index_select(0, self.index).float() / self.temperature).softmax(dim=-1)
        # Drawn on the CPU from each row's generator: the same numbers on any device, in any batch.
        uniforms = torch.cat([torch.rand(1, generator=g) for g in self.generators]).to(probs.device)
        chosen = torch.empty(len(self.sampled), dtype=torch.long, device=probs.device)
        if self.plain is not None:
            chosen[self.plain] = _draw(probs[self.plain], uniforms[self.plain])
        if self.filtered is not None:
            chosen[self.filtered] = self._draw_filtered(probs[self.filtered], uniforms[self.filtered])
        out = torch.full_like(scores, float("-inf"))
        if self.greedy is not None:
            out[self.greedy] = scores[self.greedy]
        out[self.index, chosen] = 0.0
        return cast(torch.FloatTensor, out)

    def _draw_filtered(self, probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
        vocab = probs.shape[-1]
        width = min(vocab, _CANDIDATES)
        top, order = probs.topk(width, dim=-1)
        weights, complete = _filter_sorted(top, self.settings, vocab)
        picks = order.gather(1, _draw(weights, uniforms).unsqueeze(1)).squeeze(1)
        for j in (~complete).nonzero().flatten().tolist():
            # The kept set may extend past the candidates: sort this row's whole distribution.
            full, full_order = probs[j : j + 1].sort(dim=-1, descending=True)
            row_weights, _ = _filter_sorted(full, [self.settings[j]], vocab)
            picks[j] = full_order[0, _draw(row_weights, uniforms[j : j + 1])[0]]
        return picks


def _draw(weights: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Index drawn from each row of unnormalised ``weights`` by inverse CDF."""
    cumulative = weights.cumsum(dim=-1)
    targets = (uniforms * cumulative[:, -1]).unsqueeze(1)
    # right=True: the first index whose cumulative weight exceeds the target, so zero weights are never drawn.
    picks = torch.searchsorted(cumulative, targets, right=True).squeeze(1)
    return picks.clamp_(max=weights.shape[-1] - 1)


def _filter_sorted(top: torch.Tensor, settings: Sequence[RowSampling], vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Weights of the kept tokens among descending probabilities ``top`` (a prefix of each row's
    sorted distribution), and whether that prefix surely holds every kept token of the row.

    top-k applies first; top-p and min-p act on the distribution it leaves, as in vLLM and transformers.
    """
    width = top.shape[-1]
    device = top.device
    ranks = torch.arange(width, device=device).unsqueeze(0)
    top_k = torch.tensor([s.top_k if s.top_k and 0 < s.top_k < vocab else vocab for s in settings], device=device)
    top_p = torch.tensor([s.top_p if s.top_p < 1.0 else float("inf") for s in settings], device=device)
    min_p = torch.tensor([s.min_p for s in settings], device=device)
    drop = ranks >= top_k.unsqueeze(1)
    kept = top.masked_fill(drop, 0.0)
    # Mass the top-k cut leaves; 1 when top-k reaches past the prefix (softmax sums to one).
    mass = torch.where(top_k <= width, kept.sum(dim=-1), torch.ones_like(top_p))
    normalised = kept / mass.unsqueeze(1)
    cumulative = normalised.cumsum(dim=-1)
    drop |= (cumulative - normalised) > top_p.unsqueeze(1)
    drop |= normalised < (min_p * normalised[:, 0]).unsqueeze(1)
    drop[:, 0] = False
    weights = top.masked_fill(drop, 0.0)
    # A token past the prefix could be kept only if no rule has cut the prefix's last position yet.
    last = normalised[:, -1]
    cut_by_k = top_k <= width
    cut_by_p = cumulative[:, -1] > top_p
    cut_by_min_p = last < min_p * normalised[:, 0]
    # A top-k reaching past the prefix renormalises by mass the prefix cannot see.
    k_beyond = (top_k > width) & (top_k < vocab)
    complete = (width >= vocab) | (~k_beyond & (cut_by_k | cut_by_p | cut_by_min_p))
    return weights, complete


class RowStops(StoppingCriteria):
    """Ends each row at an end-of-sequence token, its own token budget or a stop string, and every
    row once the batch is cancelled.

    End-of-sequence is handled here rather than by ``generate`` so that a row may ignore it
    (``ignore_eos``) while the others in its batch do not.
    """

    def __init__(
        self,
        prompt_length: int,
        budgets: Sequence[int],
        stops: Sequence[Sequence[str]],
        eos: Sequence[frozenset[int]],
        cancelled: Sequence[Callable[[], bool]],
        decode: Callable[[list[int]], str],
    ) -> None:
        self.prompt_length = prompt_length
        self.budgets = list(budgets)
        self.stops = [list(s) for s in stops]
        self.eos = list(eos)
        self.cancelled = list(cancelled)
        self.decode = decode
        # A stop string is completed by the newest tokens; a window a little longer than the string
        # (each token spelling at least one character, byte pieces aside) is enough to see it.
        self.windows = [max((len(s) for s in row), default=0) + 4 for row in self.stops]
        self.finished = [False] * len(self.budgets)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs: object) -> torch.BoolTensor:
        generated = input_ids.shape[1] - self.prompt_length
        newest = input_ids[:, -1].tolist()
        for row, budget in enumerate(self.budgets):
            if self.finished[row]:
                continue  # its later tokens are filler, cut off afterwards
            done = generated >= budget or newest[row] in self.eos[row] or self.cancelled[row]()
            if not done and self.stops[row] and generated > 0:
                window = input_ids[row, -min(generated, self.windows[row]) :].tolist()
                text = self.decode(window)
                done = any(stop in text for stop in self.stops[row])
            self.finished[row] = done
        return cast(torch.BoolTensor, torch.tensor(self.finished, device=input_ids.device, dtype=torch.bool))

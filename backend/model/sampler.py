"""Batched token sampler: penalties, greedy/temperature/top-k/top-p/min-p, per-request seeds, logprobs.

Every step is a tensor op over the whole batch ([N, V]); Python loops only run over rows for per-row
scalars (and over seeded rows, to draw their noise from their own generator). The only device->host
transfer is one non-blocking copy at the end (``SampledTokens``). Seeded rows repeat exactly on one
device type; CPU and CUDA runs of the same seed differ (different random engines). A seeded sequence's
generator lives here, keyed by sequence id, from its first sample until ``forget`` is told the sequence
ended.
"""

from __future__ import annotations

import torch

from pagetron.backend.core.sampling_params import SamplingParams
from pagetron.backend.core.sequence import Sequence
from pagetron.backend.core.step import GrammarMask, RunnerOutput
from pagetron.backend.model.host_copy import to_device
from pagetron.kernels.token_bitmask_ref import apply_token_bitmask_ref


class Sampler:
    def __init__(self, eos_token_ids: set[int] | list[int], seed: int = 0, kernels: str = "torch"):
        """``kernels``: the model's kernel set (model.kernel_ops), which the grammar masks follow too."""
        self.eos_token_ids = sorted(set(eos_token_ids))
        self.seed = seed
        self._generators: dict[tuple[torch.device, bool], torch.Generator] = {}
        self._seeded: dict[int, torch.Generator] = {}  # seq id -> its own CPU generator
        self._bitmasks = BitmaskUpload(kernels)

    def forget(self, seq_ids: list[int]) -> None:
        """Drops the generators of sequences that ended."""
        for seq_id in seq_ids:
            self._seeded.pop(seq_id, None)

    def __call__(
        self, logits: torch.Tensor, seqs: list[Sequence], grammar: GrammarMask | None = None
    ) -> RunnerOutput:
        return self.sample(logits, seqs, grammar).output()

    def sample(
        self,
        logits: torch.Tensor,
        seqs: list[Sequence],
        grammar: GrammarMask | None = None,
        outputs_before: list[int] | None = None,
    ) -> SampledTokens:
        """Samples without waiting for the device: the result's ``output()`` brings it to the host.
        ``grammar``: the constrained rows' allowed tokens (logprobs stay those of the raw logits).
        ``outputs_before``: each row's output tokens before the one it samples (``outputs_before(seqs)``
        when the step was launched; counted now if None)."""
        assert logits.dim() == 2 and logits.shape[0] == len(seqs), (tuple(logits.shape), len(seqs))
        params = [seq.sampling_params for seq in seqs]
        logits = logits.to(torch.float32, copy=True)  # modified in place below
        raw_logprobs = torch.log_softmax(logits, dim=-1)
        if grammar is not None:
            self._bitmasks.apply(logits, grammar)
        _apply_logit_bias(logits, params)
        self._mask_stop_tokens_below_min_tokens(logits, seqs, outputs_before)
        _apply_penalties(logits, seqs)
        token_ids = self._sample(logits, seqs)
        sampled_logprobs = raw_logprobs.gather(1, token_ids[:, None]).squeeze(1)
        return SampledTokens(raw_logprobs, token_ids, sampled_logprobs, params)

    @staticmethod
    def outputs_before(seqs: list[Sequence]) -> list[int] | None:
        """Each row's output tokens before the one it samples: the known ones and any earlier step's still
        pending (None when no row has min_tokens). A step whose sampling waits (constrained rows that ran
        ahead) counts them at launch: by the time it samples, the next step may be scheduled."""
        if not any(seq.sampling_params.min_tokens for seq in seqs):
            return None
        return [seq.num_output_tokens + max(seq.num_pending_tokens - 1, 0) for seq in seqs]

    def _mask_stop_tokens_below_min_tokens(
        self, logits: torch.Tensor, seqs: list[Sequence], outputs_before: list[int] | None
    ) -> None:
        vocab_size = logits.shape[1]
        rows: list[int] = []
        cols: list[int] = []
        before = outputs_before if outputs_before is not None else self.outputs_before(seqs)
        for i, seq in enumerate(seqs):
            p = seq.sampling_params
            if not p.min_tokens or before is None or before[i] >= p.min_tokens:
                continue
            if seq.grammar is not None:  # the grammar decides where it ends (it allows EOS only then)
                continue
            stop_ids = set(p.stop_token_ids or ())
            if not p.ignore_eos:  # with ignore_eos, EOS does not stop the sequence, so it needs no mask
                stop_ids.update(self.eos_token_ids)
            for token_id in sorted(t for t in stop_ids if t < vocab_size):
                rows.append(i)
                cols.append(token_id)
        if rows:
            index = (to_device(rows, logits.device), to_device(cols, logits.device))
            logits[index] = float("-inf")

    def _sample(self, logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        params = [seq.sampling_params for seq in seqs]
        greedy_ids = logits.argmax(dim=-1)
        if all(p.greedy for p in params):
            return greedy_ids
        device = logits.device
        temperatures = to_device([1.0 if p.greedy else p.temperature for p in params], device)
        logits = _apply_top_k_top_p(logits / temperatures[:, None], params)
        probs = logits.softmax(dim=-1)
        if any(p.min_p > 0 for p in params):
            min_p = to_device([p.min_p for p in params], device)
            threshold = min_p[:, None] * probs.amax(dim=-1, keepdim=True)
            probs = probs.masked_fill(probs < threshold, 0.0)
        # Exponential race: argmax(p_i / E_i) with E_i ~ Exp(1) picks i with probability p_i / sum(p)
        # (no renormalisation needed after masking).
        sampled_ids = probs.div_(self._exponential_noise(probs, seqs)).argmax(dim=-1)
        is_greedy = to_device([p.greedy for p in params], device)
        return torch.where(is_greedy, greedy_ids, sampled_ids)

    def _exponential_noise(self, probs: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        device = probs.device
        noise = torch.empty_like(probs).exponential_(generator=self._generator(device))
        for i, seq in enumerate(seqs):
            seed = seq.sampling_params.seed
            if seed is None or seq.sampling_params.greedy:
                continue
            gen = self._seeded.get(seq.seq_id)
            if gen is None:  # the n copies of a request draw different streams
                gen = self._seeded[seq.seq_id] = torch.Generator().manual_seed(seed + seq.index)
            if gen.device != device:
                # A vocab row of CPU noise costs milliseconds; instead the request's generator draws a seed
                # for a scratch generator on the logits' device: the row still depends only on its request.
                step_seed = int(torch.randint(0, 2**62, (), generator=gen))
                gen = self._generator(device, scratch=True)
                gen.manual_seed(step_seed)
            noise[i].exponential_(generator=gen)
        # exponential_ may return exactly 0, which would turn a masked 0 prob into NaN (0/0)
        return noise.clamp_min_(torch.finfo(noise.dtype).tiny)

    def _generator(self, device: torch.device, scratch: bool = False) -> torch.Generator:
        """The default generator (unseeded rows) or the scratch one (seeded rows) for ``device``."""
        gen = self._generators.get((device, scratch))
        if gen is None:
            gen = torch.Generator(device=device)
            gen.manual_seed(self.seed)
            self._generators[(device, scratch)] = gen
        return gen


class BitmaskUpload:
    """Applies a step's grammar bitmasks on the logits' device: one copy to the device and one kernel (the
    OpenAI-Triton one with the triton kernel set, its torch reference with torch's), no host sync.

    NOTE: on CUDA the masks go through one pinned staging buffer, kept from step to step (a fresh pinned
    buffer each step costs an allocation and a copy on the host). Before it is overwritten the host waits
    for the last upload's event. That upload was queued before its step's sampling, whose samples the
    engine usually read already; where it did not (a constrained step launched right after one whose
    sampling waited), the wait ends with that step, whose result the engine waits for next anyway.
    """

    def __init__(self, kernels: str = "torch") -> None:
        self._apply = apply_token_bitmask_ref
        if kernels == "triton":
            from pagetron.kernels.token_bitmask import apply_token_bitmask

            self._apply = apply_token_bitmask
        self._staging: torch.Tensor | None = None  # pinned int32 [rows, width]
        self._words: torch.Tensor | None = None  # the device copy
        self._uploaded: torch.cuda.Event | None = None

    def apply(self, logits: torch.Tensor, grammar: GrammarMask) -> None:
        device = logits.device
        words = torch.from_numpy(grammar.bitmask)
        words = self._upload(words, device) if device.type == "cuda" else words.to(device)
        every_row = len(grammar.rows) == logits.shape[0]  # rows are sorted: then they are 0..n-1
        self._apply(logits, words, None if every_row else to_device(grammar.rows, device, torch.int32))

    def _upload(self, words: torch.Tensor, device: torch.device) -> torch.Tensor:
        n, width = words.shape
        if self._staging is None or self._staging.shape[0] < n or self._staging.shape[1] != width:
            capacity = max(n, 2 * self._staging.shape[0] if self._staging is not None else 64)
            self._staging = torch.empty((capacity, width), dtype=torch.int32, pin_memory=True)
            self._words = torch.empty((capacity, width), dtype=torch.int32, device=device)
            self._uploaded = torch.cuda.Event()
        else:
            self._uploaded.synchronize()
        self._staging[:n].copy_(words)
        self._words[:n].copy_(self._staging[:n], non_blocking=True)
        self._uploaded.record()
        return self._words[:n]


def _apply_logit_bias(logits: torch.Tensor, params: list[SamplingParams]) -> None:
    rows, cols, values = [], [], []
    for i, p in enumerate(params):
        if not p.logit_bias:
            continue
        for token_id, bias in p.logit_bias.items():
            if token_id < logits.shape[1]:
                rows.append(i)
                cols.append(token_id)
                values.append(bias)
    if rows:
        device = logits.device
        index = (to_device(rows, device), to_device(cols, device))
        logits.index_put_(index, to_device(values, device), accumulate=True)


def _apply_penalties(logits: torch.Tensor, seqs: list[Sequence]) -> None:
    """Repetition penalty on prompt + output tokens, frequency / presence penalties on output tokens."""
    params = [seq.sampling_params for seq in seqs]
    needs_repetition = any(p.repetition_penalty != 1.0 for p in params)
    needs_output = any(p.frequency_penalty != 0.0 or p.presence_penalty != 0.0 for p in params)
    if not (needs_repetition or needs_output):
        return
    device = logits.device
    output_counts = _token_counts([seq.output_token_ids for seq in seqs], logits.shape[1], device)
    if needs_repetition:
        prompt_counts = _token_counts([seq.prompt_token_ids for seq in seqs], logits.shape[1], device)
        seen = (prompt_counts > 0) | (output_counts > 0)
        penalty = to_device([p.repetition_penalty for p in params], device)[:, None]
        penalized = torch.where(logits > 0, logits / penalty, logits * penalty)
        logits.copy_(torch.where(seen, penalized, logits))
    if needs_output:
        frequency = to_device([p.frequency_penalty for p in params], device)[:, None]
        presence = to_device([p.presence_penalty for p in params], device)[:, None]
        logits -= frequency * output_counts + presence * (output_counts > 0)


def _token_counts(id_lists: list[list[int]], vocab_size: int, device: torch.device) -> torch.Tensor:
    """[N, V] float counts of each token id per row; rows are padded with the out-of-range id V."""
    width = max((len(ids) for ids in id_lists), default=0)
    counts = torch.zeros(len(id_lists), vocab_size + 1, device=device)
    if width == 0:
        return counts[:, :vocab_size]
    padded = [ids + [vocab_size] * (width - len(ids)) for ids in id_lists]
    index = to_device(padded, device, torch.long)
    counts.scatter_add_(1, index, torch.ones(index.shape, device=device))
    return counts[:, :vocab_size]


def _apply_top_k_top_p(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """Mask (to -inf) tokens outside each row's top-k, then outside its top-p nucleus."""
    vocab_size = logits.shape[1]
    top_k = [vocab_size if p.top_k <= 0 else min(p.top_k, vocab_size) for p in params]
    top_p = [p.top_p if p.top_p < 1.0 else float("inf") for p in params]  # inf: never masks, even on rounding
    needs_k = any(k < vocab_size for k in top_k)
    needs_p = any(p < 1.0 for p in top_p)
    if not (needs_k or needs_p):
        return logits
    device = logits.device
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    if needs_k:
        k = to_device(top_k, device)
        kth_largest = sorted_logits.gather(1, (k - 1)[:, None])
        sorted_logits.masked_fill_(sorted_logits < kth_largest, float("-inf"))  # ties with the k-th stay
    if needs_p:
        sorted_probs = sorted_logits.softmax(dim=-1)
        mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
        # keep the smallest prefix whose mass reaches p; the most likely token always stays
        sorted_logits.masked_fill_(mass_before >= to_device(top_p, device)[:, None], float("-inf"))
    return torch.empty_like(logits).scatter_(1, order, sorted_logits)


class SampledTokens:
    """One step's samples. ``token_ids`` stay on the device, where the next step's pending input rows
    read them; everything the host needs travels in one float64 tensor (it holds every token id, rank
    and float32 logprob exactly), copied without blocking as soon as it is made; ``output()`` waits for
    that copy only."""

    def __init__(
        self,
        raw_logprobs: torch.Tensor,
        token_ids: torch.Tensor,
        sampled_logprobs: torch.Tensor,
        params: list[SamplingParams],
    ):
        self.token_ids = token_ids
        self._num_rows = len(params)
        self._wanted = [p.logprobs for p in params]
        vocab = raw_logprobs.shape[1]
        self._max_top = max((min(w, vocab) for w in self._wanted if w is not None), default=None)
        parts = [token_ids, sampled_logprobs]
        if self._max_top is not None:
            # rank = number of tokens at least as likely as the sampled one (vLLM's convention)
            parts.append((raw_logprobs >= sampled_logprobs[:, None]).sum(dim=-1))
            if self._max_top > 0:
                top_logprobs, top_ids = raw_logprobs.topk(self._max_top, dim=-1)
                parts += [top_ids.flatten(), top_logprobs.flatten()]
        flat = torch.cat([part.to(torch.float64) for part in parts])
        self._ready: torch.cuda.Event | None = None
        if flat.is_cuda:
            flat = flat.to("cpu", non_blocking=True)  # into pinned memory, behind the step's kernels
            self._ready = torch.cuda.Event()
            self._ready.record()
        self._flat = flat

    def output(self) -> RunnerOutput:
        if self._ready is not None:
            self._ready.synchronize()
        return _unpack(self._flat.tolist(), self._num_rows, self._max_top, self._wanted)


def _unpack(flat: list[float], num_rows: int, max_top: int | None, wanted: list[int | None]) -> RunnerOutput:
    ids = [int(x) for x in flat[:num_rows]]
    sampled = flat[num_rows : 2 * num_rows]
    logprobs: list[dict[int, tuple[float, int]] | None] = [None] * num_rows
    if max_top is not None:
        ranks = flat[2 * num_rows : 3 * num_rows]
        top_ids_flat = flat[3 * num_rows : 3 * num_rows + num_rows * max_top]
        top_lps_flat = flat[3 * num_rows + num_rows * max_top :]
        for i, n in enumerate(wanted):
            if n is None:
                continue
            start = i * max_top
            top = range(min(n, max_top))
            entry = {int(top_ids_flat[start + r]): (top_lps_flat[start + r], r + 1) for r in top}
            entry.setdefault(ids[i], (sampled[i], int(ranks[i])))
            logprobs[i] = entry
    return RunnerOutput(token_ids=ids, sampled_logprobs=sampled, logprobs=logprobs)

"""`InferenceEngine`: the user-facing front of the scheduler: text in, text out (blocking,
streaming or async), plus a token-level batch API for online RL."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Any

import torch
from torch import nn

from astrai_serve.adapters import BASE_ID, ServedAdapters, UnknownAdapterError
from astrai_serve.kvcache import KVCache
from astrai_serve.request import GenerateResult, GenerationRequest
from astrai_serve.sampling import SamplingParams
from astrai_serve.scheduler import InferenceScheduler
from astrai_serve.task import Task
from astrai_serve.text_output import TextOutput
from astrai_serve.watch import LoopWaker, WatchGroup

DEFAULT_CPU_CACHE_BYTES = 1 << 30
DEFAULT_STEP_TOKENS = 2048  # token budget per step: big GEMMs, yet a step stays well under a second
DEFAULT_GPU_CACHE_FRACTION = 0.5  # of the memory free when the engine starts


class InferenceEngine:
    """Serve a causal LM (an astrai-core `Transformer`, used as given: no copy, no mode change).

    Args:
        model: the model; its parameters' device and dtype are the engine's.
        tokenizer: an `AutoTokenizer`-like object; needed for text prompts, optional for
            `generate_ids`.
        max_batch_size: running requests at most (more wait in the queue).
        max_seq_len: context window per request (default and upper bound: the model's max_seq_len).
        page_size: tokens per KV page.
        kv_cache_tokens / kv_cache_bytes: KV cache size, by tokens or by memory (one of them;
            default 1 GiB on CPU, half the free memory on CUDA, never more than
            max_batch_size full-length requests need).
        max_num_tokens: token budget per step (decode tokens + prefill chunk tokens); default
            2048, and at least max_batch_size.
        enable_prefix_cache: reuse the K/V of identical prompt prefixes.
        default_max_tokens: max_tokens when a call does not give one.
        adapters: LoRA adapters installed into `model` (`ServedAdapters.load`); a request picks
            one by name (`SamplingParams.adapter`), and requests for different adapters share
            batches.
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any = None,
        *,
        max_batch_size: int = 64,
        max_seq_len: int | None = None,
        page_size: int = 16,
        kv_cache_tokens: int | None = None,
        kv_cache_bytes: int | None = None,
        max_num_tokens: int | None = None,
        enable_prefix_cache: bool = True,
        default_max_tokens: int = 256,
        adapters: ServedAdapters | None = None,
    ) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        self.model = model
        self.tokenizer = tokenizer
        self.max_batch_size = max_batch_size
        self.default_max_tokens = default_max_tokens
        self.adapters = adapters
        model_len = model.config.max_seq_len
        if max_seq_len is not None and not 1 < max_seq_len <= model_len:
            raise ValueError(f"max_seq_len must be in [2, {model_len}] (the model's max_seq_len), "
                             f"got {max_seq_len}")
        self.max_seq_len = max_seq_len or model_len
        self.kvcache = self._build_cache(page_size, kv_cache_tokens, kv_cache_bytes, enable_prefix_cache)
        if max_num_tokens is None:
            max_num_tokens = max(DEFAULT_STEP_TOKENS, max_batch_size)
        self.scheduler = InferenceScheduler(model, self.kvcache, max_batch_size, max_num_tokens,
                                            self.max_seq_len, adapters)
        self._ids = itertools.count()
        self._stop_ids = self._tokenizer_stop_ids()
        self.scheduler.start()

    def _build_cache(self, page_size: int, tokens: int | None, nbytes: int | None,
                     prefix: bool) -> KVCache:
        p = next(self.model.parameters())
        if tokens is None and nbytes is None:
            tokens = self.max_batch_size * self.max_seq_len
            spec, n_layers = self.model.kv_spec(), self.model.config.n_layers
            per_token = n_layers * spec.elements_per_token() * p.dtype.itemsize
            if p.device.type == "cuda":
                budget = int(torch.cuda.mem_get_info(p.device)[0] * DEFAULT_GPU_CACHE_FRACTION)
            else:
                budget = DEFAULT_CPU_CACHE_BYTES
            tokens = min(tokens, max(budget // per_token, self.max_seq_len))
        return KVCache(self.model.kv_spec(), self.model.config.n_layers, page_size, tokens, nbytes,
                       p.dtype, p.device, enable_prefix_cache=prefix)

    def _tokenizer_stop_ids(self) -> frozenset[int]:
        if self.tokenizer is None:
            return frozenset()
        ids = set(getattr(self.tokenizer, "stop_ids", None) or [])
        eos = getattr(self.tokenizer, "eos_id", None)
        if eos is not None:
            ids.add(eos)
        return frozenset(ids)

    # -- health and life cycle ----------------------------------------------------------------
    @property
    def healthy(self) -> bool:
        return self.scheduler.healthy

    def shutdown(self) -> None:
        """Stop the step loop; requests still in flight finish with reason "abort"."""
        self.scheduler.stop()

    def __enter__(self) -> InferenceEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    def get_stats(self) -> dict[str, Any]:
        return self.scheduler.get_stats()

    def reset_prefix_cache(self) -> None:
        """Forget every cached prefix; call after changing the weights."""
        self.scheduler.call(self.kvcache.reset_prefix_cache)

    # -- token level --------------------------------------------------------------------------
    def submit(
        self,
        prompt_ids: Sequence[int],
        params: SamplingParams | None = None,
        text: bool = False,
    ) -> GenerateResult:
        """Queue one request and return its live result at once (non-blocking)."""
        task = self._task(prompt_ids, params, text)
        self.scheduler.add_task(task)
        return task.result

    def submit_many(
        self,
        prompts: Sequence[Sequence[int]],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
        text: bool = False,
    ) -> list[GenerateResult]:
        """Queue several requests atomically (non-blocking): they enter the same step, so a
        batch of seeded requests is reproducible run after run (online RL, evaluation)."""
        if params is None or isinstance(params, SamplingParams):
            params = [params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"got {len(params)} sampling params for {len(prompts)} prompts")
        tasks = [self._task(p, sp, text) for p, sp in zip(prompts, params, strict=True)]
        self.scheduler.add_tasks(tasks)
        return [t.result for t in tasks]

    def _task(self, prompt_ids: Sequence[int], params: SamplingParams | None, text: bool) -> Task:
        params = params or SamplingParams(max_tokens=self.default_max_tokens)
        adapter = self.adapter_id(params.adapter)  # an unknown name fails before anything else
        prompt = [int(t) for t in prompt_ids]
        return Task(f"req-{next(self._ids)}", prompt, params, text=self._text_output(params, text),
                    stop_ids=self._stop_ids_for(params), generator=self._generator(params),
                    matcher=params.grammar.matcher() if params.grammar is not None else None,
                    adapter=adapter)

    @property
    def adapter_names(self) -> tuple[str, ...]:
        """The LoRA adapters a request may name (`SamplingParams.adapter`)."""
        return self.adapters.names if self.adapters is not None else ()

    def adapter_id(self, name: str | None) -> int:
        """0 for the base model (None), else the served adapter's id; `UnknownAdapterError`
        (a ValueError) listing the served names for any other name."""
        if name is None:
            return BASE_ID
        if self.adapters is None:
            raise UnknownAdapterError(f"no LoRA adapter named '{name}' is served: this engine "
                                      "serves the base model alone")
        return self.adapters.id_of(name)

    def abort(self, request_id: str) -> None:
        self.scheduler.remove_task(request_id)

    def generate_ids(
        self,
        prompts: Sequence[Sequence[int]],
        params: SamplingParams | None = None,
        n: int = 1,
        **options: Any,
    ) -> list[GenerateResult]:
        """Generate `n` samples per prompt and wait; results are grouped by prompt
        (prompt 0's n samples first). With a seed, sample i uses seed + i
        (`SamplingParams.for_sample`). With n > 1 and the
        prefix cache on, the other samples start once the first has computed the prompt, so they
        read it from the cache instead of computing it n times; otherwise every request enters
        at once, which makes seeded results reproducible run after run."""
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        base = params or SamplingParams(**{"max_tokens": self.default_max_tokens, **options})
        samples = [base.for_sample(i) for i in range(n)]
        if n == 1 or not self.kvcache.enable_prefix_cache:
            # All at once: the same requests run in the same steps every time.
            grouped = [(prompt, p) for prompt in prompts for p in samples]
            results = self.submit_many([g[0] for g in grouped], [g[1] for g in grouped])
            return [r.wait_completion() for r in results]
        firsts = self.submit_many(prompts, samples[0])
        for r in firsts:  # the prompt's pages are cached once its first token exists
            r.wait_first_token()
        rest = self.submit_many([prompt for prompt in prompts for _ in samples[1:]],
                                [p for _ in prompts for p in samples[1:]])
        groups = [[first, *rest[i * (n - 1):(i + 1) * (n - 1)]] for i, first in enumerate(firsts)]
        return [r.wait_completion() for group in groups for r in group]

    # -- text ---------------------------------------------------------------------------------
    def generate(
        self,
        prompt: str | Sequence[str],
        stream: bool = False,
        max_tokens: int | None = None,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = 0,
        **options: Any,
    ) -> str | list[str] | Iterator[str]:
        """Text for one prompt, a list of texts for a list, or (stream=True, one prompt) a
        generator of text pieces. `options` are any other `SamplingParams` fields."""
        params = self._params(max_tokens, temperature, top_p, top_k, options)
        if isinstance(prompt, str):
            result = self.submit(self._encode(prompt), params, text=True)
            return self.stream_text(result) if stream else result.wait_completion().text
        if stream:
            raise ValueError("stream=True takes one prompt; call generate once per prompt")
        results = [self.submit(self._encode(p), params, text=True) for p in prompt]
        return [r.wait_completion().text for r in results]

    def generate_with_request(self, request: GenerationRequest) -> str | Iterator[str]:
        """A chat request through the tokenizer's chat template."""
        ids = self._require_tokenizer().apply_chat_template(
            request.messages, add_generation_prompt=True, tokenize=True)
        result = self.submit(ids, request.sampling_params(self.default_max_tokens), text=True)
        return self.stream_text(result) if request.stream else result.wait_completion().text

    async def generate_async(
        self,
        prompt: str,
        max_tokens: int | None = None,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = 0,
        **options: Any,
    ) -> AsyncIterator[str]:
        """Stream text pieces into an asyncio loop (through the same `WatchGroup` as the HTTP
        API); closing the generator aborts the request."""
        params = self._params(max_tokens, temperature, top_p, top_k, options)
        group = WatchGroup(self, LoopWaker(asyncio.get_running_loop()))
        try:
            watch = group.submit(self._encode(prompt), params)
            async for _, delta in group.deltas():
                if delta.text:
                    yield delta.text
            watch.result.wait_completion(0)  # raises if the engine failed
        finally:
            group.close()

    def stream_text(self, result: GenerateResult) -> Iterator[str]:
        """The text pieces of a submitted request as they arrive (`submit(..., text=True)`);
        closing the iterator early (the consumer is gone, Ctrl-C) aborts the request."""
        try:
            while True:
                result.wait_for_update()
                yield from result.pop_all()
                if result.done:
                    break
            result.wait_completion(0)
        finally:  # the consumer stopped early (client gone): free its pages now
            if not result.done:
                self.abort(result.request_id)

    # -- helpers ------------------------------------------------------------------------------
    def _params(self, max_tokens, temperature, top_p, top_k, options) -> SamplingParams:
        return SamplingParams(max_tokens=max_tokens or self.default_max_tokens,
                              temperature=temperature, top_p=top_p, top_k=top_k, **options)

    def _require_tokenizer(self) -> Any:
        if self.tokenizer is None:
            raise ValueError("this engine has no tokenizer: pass one to InferenceEngine, or use "
                             "generate_ids with token ids")
        return self.tokenizer

    def _encode(self, prompt: str) -> list[int]:
        if not isinstance(prompt, str):
            raise TypeError(f"a prompt must be a str, got {type(prompt).__name__}")
        return list(self._require_tokenizer().encode(prompt))

    def _text_output(self, params: SamplingParams, text: bool) -> TextOutput | None:
        if not (text or params.stop):
            return None
        return TextOutput(self._require_tokenizer().stream_decoder(skip_special_tokens=True), params.stop)

    def _stop_ids_for(self, params: SamplingParams) -> frozenset[int]:
        ids = set(params.stop_token_ids)
        if not params.ignore_eos:
            ids |= self._stop_ids
        return frozenset(ids)

    def _generator(self, params: SamplingParams) -> torch.Generator | None:
        if params.seed is None:
            return None
        device = next(self.model.parameters()).device
        return torch.Generator(device=device).manual_seed(params.seed)

"""The `astrai` model of lm-evaluation-harness: its `loglikelihood`, `loglikelihood_rolling` and
`generate_until` on an AstrAI model and astrai-serve's `InferenceEngine`.

- loglikelihood: batched; the answers of a multiple-choice question share their context, which
  is computed once. `scoring="engine"` scores on the engine (the continuation forced as its
  output, the context served by the prefix cache: `engine_scoring`); `scoring="model"` runs the
  model directly, one batched forward over the distinct contexts and one over the answers
  (`scoring.score_requests`). Both give the same numbers; docs/benchmarks.md says which is faster.
- loglikelihood_rolling: whole documents in windows of the context window (`rolling_windows`),
  straight from the model (the engine returns no prompt log-probabilities).
- generate_until: the engine, greedy unless the task samples, with the task's stop strings.

Registered with lm-eval as "astrai" when this module is imported; `astrai eval` does that.
This module needs lm-eval (`pip install 'astrai-train[eval]'`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model

from astrai_train.evaluation.engine_scoring import score_with_engine
from astrai_train.evaluation.models import load_eval_model
from astrai_train.evaluation.progress import RequestProgress
from astrai_train.evaluation.scoring import rolling_windows, score_requests, score_rows

SCORING = ("engine", "model")
DEFAULT_SCORING = "engine"
DEFAULT_MAX_GEN_TOKS = 256  # the harness's default for generate_until


@register_model("astrai")
class AstraiLM(TemplateLM):
    """lm-eval model over an AstrAI model folder (`pretrained=DIR`) or objects in memory
    (`model=`, `tokenizer=`, optionally a running `engine=`)."""

    def __init__(self, pretrained: str | None = None, *, model: Any = None, tokenizer: Any = None,
                 engine: Any = None, device: str | None = None, dtype: str | None = None,
                 batch_size: int | str | None = None, max_batch_size: int | None = None,
                 max_seq_len: int | None = None, scoring: str = DEFAULT_SCORING,
                 max_gen_toks: int = DEFAULT_MAX_GEN_TOKS,
                 progress: RequestProgress | None = None, **_: Any) -> None:
        super().__init__()
        if scoring not in SCORING:
            raise ValueError(f"scoring must be one of {', '.join(SCORING)}, got {scoring!r}")
        if model is None:
            if pretrained is None:
                raise ValueError("the astrai lm-eval model needs pretrained=MODEL_DIR (or model= "
                                 "and tokenizer= from Python)")
            loaded = load_eval_model(Path(pretrained), device, dtype)
            model, tokenizer = loaded.model, loaded.tokenizer
        if tokenizer is None:
            raise ValueError("the astrai lm-eval model needs the model's tokenizer")
        if tokenizer.eos_id is None:
            raise ValueError("the tokenizer names no eos token, which scoring uses as the prefix "
                             "of empty contexts; set eos_token in tokenizer_config.json")
        self.model, self.tokenizer = model, tokenizer
        self._engine, self._owns_engine = engine, engine is None
        self.scoring = scoring
        self.max_gen_toks = int(max_gen_toks)
        self.batch = int(batch_size) if str(batch_size or "").isdigit() else 64
        self.batch = max(self.batch, int(max_batch_size or 0))
        limit = int(model.config.max_seq_len)
        if max_seq_len is not None and not 1 < int(max_seq_len) <= limit:
            raise ValueError(f"max_seq_len must be in [2, {limit}] (the model's), got {max_seq_len}")
        self._max_length = int(max_seq_len or limit)
        self.progress = progress or RequestProgress(enabled=False)

    # -- what TemplateLM asks ------------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return int(self.tokenizer.eos_id)

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def tokenizer_name(self) -> str:
        return f"astrai-{self.tokenizer.fingerprint()[:16]}"

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **_: Any
                   ) -> list[int]:
        return list(self.tokenizer.encode(string, add_special_tokens=bool(add_special_tokens)))

    def tok_decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens)

    def apply_chat_template(self, chat_history: list[dict[str, str]],
                            add_generation_prompt: bool = True) -> str:
        return self.tokenizer.apply_chat_template(chat_history, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt)

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        return self.tokenizer.chat_template if chat_template else None

    # -- the engine, started on first use ------------------------------------------------------
    @property
    def engine(self) -> Any:
        if self._engine is None:
            from astrai_serve import InferenceEngine

            self._engine = InferenceEngine(self.model, self.tokenizer, max_batch_size=self.batch,
                                           max_seq_len=self._max_length)
        return self._engine

    def close(self) -> None:
        """Stop the engine this adapter started (one passed in is the caller's)."""
        if self._owns_engine and self._engine is not None:
            self._engine.shutdown()
            self._engine = None

    # -- the three request types ---------------------------------------------------------------
    def loglikelihood(self, requests: list[Any], disable_tqdm: bool = False
                      ) -> list[tuple[float, bool]]:
        # The harness's tokenizing bar is replaced by ours over the requests themselves.
        return super().loglikelihood(requests, disable_tqdm=True)

    def _loglikelihood_tokens(self, requests: list[tuple[tuple[str, str], list[int], list[int]]],
                              disable_tqdm: bool = False, **_: Any) -> list[tuple[float, bool]]:
        pairs = [(context, continuation) for _, context, continuation in requests]
        with self.progress.track("loglikelihood", len(pairs)) as advance:
            if self.scoring == "engine":
                scores = score_with_engine(self.engine, pairs, advance)
            else:
                scores = score_requests(self.model, pairs, self._max_length, advance=advance)
        out = [(s.logprob, s.is_greedy) for s in scores]
        for (key, _, _), answer in zip(requests, out, strict=True):
            self.cache_hook.add_partial("loglikelihood", key, answer)
        return out

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False
                              ) -> list[float]:
        documents = [self.tok_encode(request.args[0]) for request in requests]
        rows, owner = [], []
        for d, tokens in enumerate(documents):
            for row in rolling_windows(tokens, self.prefix_token_id, self._max_length):
                rows.append(row)
                owner.append(d)
        totals = [0.0] * len(documents)
        with self.progress.track("loglikelihood_rolling", len(rows), unit="windows") as advance:
            for d, score in zip(owner, score_rows(self.model, rows, advance=advance), strict=True):
                totals[d] += score.logprob
        for request, total in zip(requests, totals, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", (request.args[0],), total)
        return totals

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        prompts, params = [], []
        for request in requests:
            context, gen_kwargs = request.args
            prompt, sampling = self._generation(context, dict(gen_kwargs or {}))
            prompts.append(prompt)
            params.append(sampling)
        results = self.engine.submit_many(prompts, params, text=True)
        texts = []
        with self.progress.track("generate_until", len(results)) as advance:
            for result in results:
                texts.append(result.wait_completion().text)
                advance(1)
        for request, text in zip(requests, texts, strict=True):
            self.cache_hook.add_partial("generate_until", request.args, text)
        return texts

    def _generation(self, context: str, kwargs: dict[str, Any]) -> tuple[list[int], Any]:
        """The prompt (context cut from the left to leave room for the reply) and the sampling
        of one generate_until request, from the harness's gen_kwargs."""
        from astrai_serve import SamplingParams

        until = kwargs.pop("until", None) or []
        until = [until] if isinstance(until, str) else list(until)
        max_tokens = int(kwargs.pop("max_gen_toks", self.max_gen_toks))
        max_tokens = max(1, min(max_tokens, self._max_length - 1))
        do_sample = bool(kwargs.pop("do_sample", False))
        temperature = float(kwargs.pop("temperature", 0.0)) if do_sample else 0.0
        if do_sample and temperature == 0.0:
            temperature = 1.0
        prompt = self.tok_encode(context) or [self.prefix_token_id]
        prompt = prompt[-(self._max_length - max_tokens):]
        sampling = SamplingParams(max_tokens=max_tokens, temperature=temperature,
                                  top_p=float(kwargs.pop("top_p", 1.0)) if do_sample else 1.0,
                                  top_k=int(kwargs.pop("top_k", 0) or 0) if do_sample else 0,
                                  stop=[s for s in until if s])
        return prompt, sampling

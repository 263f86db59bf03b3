"""astrai-serve: paged KV cache with prefix caching, continuous batching with chunked prefill
and preemption, sampling, and the `InferenceEngine`."""

from importlib.metadata import version as _version

from astrai_serve.adapters import ServedAdapters, UnknownAdapterError
from astrai_serve.engine import InferenceEngine
from astrai_serve.kvcache import (
    Allocator,
    KVCache,
    KvcacheView,
    PagePool,
    PrefixCache,
    Storage,
    TaskTable,
)
from astrai_serve.request import GenerateResult, GenerationRequest, TokenLogprob
from astrai_serve.sampling import (
    BaseSamplingStrategy,
    MinPStrategy,
    PenaltyStrategy,
    SamplingParams,
    SamplingPipeline,
    TemperatureStrategy,
    TopKStrategy,
    TopPStrategy,
)
from astrai_serve.scheduler import ContextLengthError, InferenceScheduler
from astrai_serve.task import Task, TaskStatus

__version__ = _version("astrai-serve")

__all__ = [
    "Allocator", "BaseSamplingStrategy", "ContextLengthError", "GenerateResult", "GenerationRequest", "InferenceEngine",
    "InferenceScheduler", "KVCache", "KvcacheView", "MinPStrategy", "PagePool", "PenaltyStrategy",
    "PrefixCache", "SamplingParams", "SamplingPipeline", "ServedAdapters", "Storage", "Task",
    "TaskStatus", "TaskTable", "TemperatureStrategy", "TokenLogprob", "TopKStrategy",
    "TopPStrategy", "UnknownAdapterError", "__version__",
]

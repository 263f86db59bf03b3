"""astrai-data: dataset storage (HDF5/JSON), segment fetchers, SEQ/SFT/DPO/GRPO datasets, the
resumable distributed sampler, preprocessing and the synthetic bilingual corpus."""

from importlib.metadata import version as _version

from astrai_data.collate import (
    collate_dpo,
    collate_fn_for,
    collate_grpo,
    collate_prompts,
    collate_windows,
    pad_right,
)
from astrai_data.datasets import (
    BaseDataset,
    DatasetFactory,
    DPODataset,
    GRPODataset,
    SEQDataset,
    SFTDataset,
)
from astrai_data.fetcher import BaseSegmentFetcher, MultiSegmentFetcher
from astrai_data.prepare import PrepareConfig, PrepareReport, prepare
from astrai_data.prepare.inspect import DatasetSummary, inspect_dataset
from astrai_data.sampler import ResumableDistributedSampler
from astrai_data.storage import (
    BaseStorage,
    H5Storage,
    H5WriteConfig,
    JSONStorage,
    StorageMeta,
    load_h5,
    open_storage,
    save_h5,
    save_json,
)
from astrai_data.synth import (
    NUMERIC_TASKS,
    SynthReport,
    exact_answer_reward,
    extract_answer,
    format_reward,
    synthesize,
    task_spec,
)
from astrai_data.tokenizer import TokenizerLike

__version__ = _version("astrai-data")

__all__ = [
    "NUMERIC_TASKS",
    "BaseDataset",
    "BaseSegmentFetcher",
    "BaseStorage",
    "DPODataset",
    "DatasetFactory",
    "DatasetSummary",
    "GRPODataset",
    "H5Storage",
    "H5WriteConfig",
    "JSONStorage",
    "MultiSegmentFetcher",
    "PrepareConfig",
    "PrepareReport",
    "ResumableDistributedSampler",
    "SEQDataset",
    "SFTDataset",
    "StorageMeta",
    "SynthReport",
    "TokenizerLike",
    "collate_dpo",
    "collate_fn_for",
    "collate_grpo",
    "collate_prompts",
    "collate_windows",
    "exact_answer_reward",
    "extract_answer",
    "format_reward",
    "inspect_dataset",
    "load_h5",
    "open_storage",
    "pad_right",
    "prepare",
    "save_h5",
    "save_json",
    "synthesize",
    "task_spec",
]

"""Datasets by strategy; importing this package registers them with `DatasetFactory`."""

from astrai_data.datasets.base import BaseDataset
from astrai_data.datasets.dpo import DPODataset
from astrai_data.datasets.factory import DatasetFactory
from astrai_data.datasets.grpo import GRPODataset
from astrai_data.datasets.seq import SEQDataset
from astrai_data.datasets.sft import SFTDataset

__all__ = ["BaseDataset", "DPODataset", "DatasetFactory", "GRPODataset", "SEQDataset", "SFTDataset"]

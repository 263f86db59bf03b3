"""Preprocessing: JSONL inputs -> prepared dataset files, and their inspection."""

from astrai_data.prepare.config import PrepareConfig, PrepareReport
from astrai_data.prepare.pipeline import prepare

__all__ = ["PrepareConfig", "PrepareReport", "prepare"]

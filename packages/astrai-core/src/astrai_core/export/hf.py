"""`export_hf`: a Hugging Face folder (llama, qwen2 or qwen3; qwen3_moe or mixtral for experts:
whichever holds the model exactly) that `transformers` and vLLM load as it is: config.json,
model.safetensors, the tokenizer with its chat template, and generation_config.json with every
id generation stops on."""

from __future__ import annotations

import json
from pathlib import Path

from astrai_core.atomic import atomic_dir
from astrai_core.export.source import DTYPE_NAMES, ExportSource
from astrai_core.model.hf import config_to_hf, hf_family, nonzero_expert_biases, state_dict_to_hf
from astrai_core.model.weights import save_weights


def export_hf(source: ExportSource, out: Path, max_shard_bytes: int | None = None) -> str:
    """Write `source` as a Hugging Face folder at `out` (atomically); returns the family."""
    family = hf_family(source.config)  # refuses, by name, what no family holds
    biased = nonzero_expert_biases(source.state)
    if biased:
        raise ValueError(
            f"this model has no Hugging Face equivalent: its routers carry balancing biases "
            f"(e_score_correction_bias, learnt by auxiliary-loss-free balancing) in "
            f"{', '.join(biased[:3])}{' ...' if len(biased) > 3 else ''}, and {family} routes "
            "without them, so it would pick other experts; serve it with `astrai serve`, or "
            "train with --moe-bias-update-rate 0 to export it")
    config = config_to_hf(source.config, family)
    config["torch_dtype"] = DTYPE_NAMES[source.dtype]
    tok = source.tokenizer
    ids = {key: getattr(tok, attr) for key, attr in
           (("bos_token_id", "bos_id"), ("eos_token_id", "eos_id"), ("pad_token_id", "pad_id"))}
    config.update({k: v for k, v in ids.items() if v is not None})
    generation = {"eos_token_id": tok.stop_ids or ([tok.eos_id] if tok.eos_id is not None else [])}
    generation.update({k: v for k, v in ids.items() if v is not None and k != "eos_token_id"})
    with atomic_dir(out) as tmp:
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n",
                                                    encoding="utf-8")
        save_weights(state_dict_to_hf(source.state, family), tmp, max_shard_bytes)
        tok.save_pretrained(tmp)
    return family

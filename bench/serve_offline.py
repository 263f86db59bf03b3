"""Offline serving throughput and prefix-cache time to first token: AstrAI's `InferenceEngine`
against Hugging Face `transformers` `generate` (batched, same weights, fp32, same threads), in
the same run.

    uv run python bench/serve_offline.py                      # small preset, 64 requests
    uv run python bench/serve_offline.py --model 100m --requests 16
    uv run python bench/serve_offline.py --only ttft

Method (after nano-vllm's bench, scaled to a CPU): N requests with prompt and output lengths
uniform in [32, 256], random token ids, output length forced (EOS ignored), sampled at
temperature 0.6. AstrAI gets all requests at once (continuous batching); transformers gets
them in arrival order in batches of each size in --hf-batch (left-padded; a batch runs until
its longest output), and the best batch size is reported. Throughput counts only the
requested output tokens on both sides.

Prefix cache: N requests sharing a 512-token prefix (a shared system prompt) plus a unique
32-token suffix, one token each, submitted at once after one warm-up request that carries the
prefix; mean time to first token with the prefix cache on against off.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import platform
import random
import statistics
import time

import torch

from astrai_core.model import Transformer, get_preset
from astrai_core.model.hf import state_dict_to_hf
from astrai_serve import InferenceEngine, SamplingParams

MODELS = {
    "small": dict(preset="small"),
    # ~100M parameters: 12 layers of width 768, GQA 12/4 heads, 32k vocabulary.
    "100m": dict(preset="small", vocab_size=32000, dim=768, n_layers=12, dim_ffn=2048, n_heads=12,
                 n_kv_heads=4, max_seq_len=1024),
}
TEMPERATURE = 0.6


def build_models(name: str) -> tuple[Transformer, torch.nn.Module]:
    """Our model with random weights, and a transformers Qwen3 holding the very same tensors."""
    import transformers

    fields = dict(MODELS[name])
    config = get_preset(fields.pop("preset"), **fields)
    torch.manual_seed(0)
    ours = Transformer(config).eval()
    hf_config = transformers.Qwen3Config(
        vocab_size=config.vocab_size, hidden_size=config.dim, intermediate_size=config.dim_ffn,
        num_hidden_layers=config.n_layers, num_attention_heads=config.n_heads,
        num_key_value_heads=config.n_kv_heads, head_dim=config.resolved_head_dim,
        max_position_embeddings=config.max_seq_len, rms_norm_eps=config.norm_eps,
        tie_word_embeddings=config.tie_weight,
        rope_parameters={"rope_type": "default", "rope_theta": config.rope_theta},
        attn_implementation="sdpa", pad_token_id=0, bos_token_id=None, eos_token_id=None,
    )
    hf = transformers.Qwen3ForCausalLM(hf_config).eval()
    result = hf.load_state_dict(state_dict_to_hf(ours.state_dict()), strict=False)
    assert set(result.missing_keys) <= {"lm_head.weight"} and not result.unexpected_keys, result
    ids = torch.randint(0, config.vocab_size, (1, 16))
    with torch.no_grad():
        assert (hf(ids).logits - ours(ids)).abs().max() < 1e-4, "the two models differ"
    return ours, hf


def make_requests(n: int, vocab: int, seed: int = 0) -> list[tuple[list[int], int]]:
    rng = random.Random(seed)
    return [([rng.randrange(5, vocab) for _ in range(rng.randint(32, 256))], rng.randint(32, 256))
            for _ in range(n)]


def run_astrai(model: Transformer, requests: list[tuple[list[int], int]]) -> float:
    """Seconds to serve every request, all submitted at once."""
    with InferenceEngine(model, max_batch_size=len(requests)) as engine:
        warm = SamplingParams(max_tokens=4, temperature=TEMPERATURE, ignore_eos=True)
        engine.generate_ids([requests[0][0]], warm)
        engine.reset_prefix_cache()  # random prompts share nothing; do not let warm-up help
        start = time.perf_counter()
        results = [engine.submit(p, SamplingParams(max_tokens=m, temperature=TEMPERATURE,
                                                   ignore_eos=True)) for p, m in requests]
        for r in results:
            r.wait_completion()
        elapsed = time.perf_counter() - start
        assert [r.generated_tokens for r in results] == [m for _, m in requests]
        print(f"    astrai stats: {engine.get_stats()['steps']} steps, "
              f"{engine.get_stats()['preemptions']} preemptions")
    return elapsed


@torch.inference_mode()
def run_hf(hf: torch.nn.Module, requests: list[tuple[list[int], int]], batch_size: int) -> float:
    start = time.perf_counter()
    for i in range(0, len(requests), batch_size):
        chunk = requests[i : i + batch_size]
        width, new = max(len(p) for p, _ in chunk), max(m for _, m in chunk)
        ids = torch.zeros(len(chunk), width, dtype=torch.long)
        mask = torch.zeros(len(chunk), width, dtype=torch.long)
        for row, (p, _) in enumerate(chunk):
            ids[row, width - len(p) :] = torch.tensor(p)
            mask[row, width - len(p) :] = 1
        out = hf.generate(ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new,
                          do_sample=True, temperature=TEMPERATURE, top_k=0, top_p=1.0,
                          pad_token_id=0)
        assert out.shape[1] == width + new
    return time.perf_counter() - start


def throughput(args: argparse.Namespace, ours: Transformer, hf: torch.nn.Module) -> None:
    requests = make_requests(args.requests, ours.config.vocab_size)
    useful = sum(m for _, m in requests)
    print(f"\n## Throughput: {args.model}, {ours.num_parameters() / 1e6:.1f}M parameters, "
          f"{len(requests)} requests, {useful} output tokens, {torch.get_num_threads()} threads")
    times: dict[str, list[float]] = {"astrai": [], **{f"hf{bs}": [] for bs in args.hf_batch}}
    for rep in range(args.repeat):  # interleaved, so a busy spell on a shared machine hits both
        times["astrai"].append(run_astrai(ours, requests))
        print(f"    run {rep + 1}: astrai {times['astrai'][-1]:.1f} s", flush=True)
        for bs in args.hf_batch:
            times[f"hf{bs}"].append(run_hf(hf, requests, bs))
            print(f"    run {rep + 1}: transformers batch {bs}: {times[f'hf{bs}'][-1]:.1f} s", flush=True)
    best = {name: min(ts) for name, ts in times.items()}
    best_hf = min(args.hf_batch, key=lambda bs: best[f"hf{bs}"])
    print(f"\n| engine (best of {args.repeat}) | seconds | output tokens/s |\n|---|---|---|")
    print(f"| AstrAI InferenceEngine | {best['astrai']:.1f} | {useful / best['astrai']:.1f} |")
    for bs in args.hf_batch:
        t = best[f"hf{bs}"]
        print(f"| transformers generate, batch {bs} | {t:.1f} | {useful / t:.1f} |")
    print(f"\nratio (AstrAI / best transformers, batch {best_hf}): "
          f"{best[f'hf{best_hf}'] / best['astrai']:.2f}x")


def ttft(args: argparse.Namespace, ours: Transformer) -> None:
    rng = random.Random(1)
    vocab = ours.config.vocab_size
    prefix = [rng.randrange(5, vocab) for _ in range(512)]
    prompts = [prefix + [rng.randrange(5, vocab) for _ in range(32)] for _ in range(args.requests)]
    params = SamplingParams(max_tokens=1, temperature=0)
    means: dict[bool, list[float]] = {True: [], False: []}
    for _ in range(args.repeat):
        for enabled in (True, False):
            with InferenceEngine(ours, max_batch_size=args.requests,
                                 enable_prefix_cache=enabled) as engine:
                engine.generate_ids([[*prefix, 1]], params)  # warm-up; carries the shared prefix
                results = [engine.submit(p, params) for p in prompts]
                for r in results:
                    r.wait_completion()
                means[enabled].append(statistics.mean(r.first_token_time - r.arrival_time
                                                      for r in results))
                hit = engine.get_stats()["prefix_hit_rate"]
            print(f"    prefix cache {'on' if enabled else 'off'}: mean TTFT "
                  f"{means[enabled][-1] * 1e3:.1f} ms (prefix hit rate {hit:.2f})", flush=True)
    on, off = min(means[True]), min(means[False])
    print(f"\n## Prefix cache: {args.requests} requests sharing a 512-token prefix "
          f"(+32 own tokens), {torch.get_num_threads()} threads\n")
    print(f"| prefix cache | mean time to first token, ms (best of {args.repeat}) |\n|---|---|")
    print(f"| on | {on * 1e3:.1f} |\n| off | {off * 1e3:.1f} |")
    print(f"\nratio (off / on): {off / on:.1f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=list(MODELS), default="small")
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--hf-batch", type=lambda s: [int(x) for x in s.split(",")], default=[16, 32, 64])
    parser.add_argument("--only", choices=["throughput", "ttft"], default=None)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=1, help="runs per engine; the best counts")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, transformers {importlib.metadata.version('transformers')}, "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs")
    ours, hf = build_models(args.model)
    if args.only != "ttft":
        throughput(args, ours, hf)
    if args.only != "throughput":
        ttft(args, ours)


if __name__ == "__main__":
    main()

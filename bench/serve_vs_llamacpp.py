"""CPU serving against llama.cpp on the very same weights: AstrAI's `InferenceEngine` and
llama.cpp's `llama-batched-bench` / `llama-bench` on one random-weight 124.7M Llama (vocab 32000,
dim 768, 12 layers, 12/4 heads, ffn 2048), exported to GGUF by `astrai model export`, the same
threads, in one run. Prints one table: both engines, the ratios, and each as a share of this
machine's roofline (weight bytes at the measured GEMV read bandwidth, FLOPs at the measured
GEMM peak, whichever is slower), then the reduced-precision paths and the int8 kernels.

    uv run python bench/serve_vs_llamacpp.py --llama-cpp /path/to/llama.cpp/build/bin
    uv run python bench/serve_vs_llamacpp.py --llama-cpp BIN --quick      # a short smoke run
    uv run python bench/serve_vs_llamacpp.py                              # AstrAI and roofline only

llama.cpp is a benchmark-only peer (bench/README.md says how to build it). Method, after the
issue that asked for it (issue 15): 128 prompt + 128 generated tokens per sequence, 1, 16 and 64
parallel sequences, greedy, EOS ignored, prefix cache off; llama.cpp with flash attention on and
off (the better is kept) and its default F16 KV cache; plus a 512-token prefill. Every timing is
the best of --repeat runs, the two engines interleaved so a busy spell on a shared machine hits
both; the spread (worst / best) is printed too.

The greedy check runs llama-server on the F32 GGUF and compares its greedy tokens and its
tokenization of a fixed bilingual text with AstrAI's.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

import torch
import torch.nn.functional as F

from astrai_core import capability
from astrai_core.export import export_gguf, load_source
from astrai_core.model import AutoModel, ModelConfig, Transformer
from astrai_core.tokenizer import AutoTokenizer, train_tokenizer
from astrai_serve import InferenceEngine, SamplingParams, kernels
from astrai_serve.quantize import prepare_model, weight_bytes

CONFIG = dict(vocab_size=32000, dim=768, n_layers=12, dim_ffn=2048, n_heads=12, n_kv_heads=4,
              max_seq_len=1024, tie_weight=False)
TEXT = ("The quick brown fox jumps over the lazy dog. Paged attention keeps the KV cache in pages. "
        "小模型也可以在普通电脑上运行。中文和英文都可以。Numbers like 12345 and 678 split into digits. ")


# -- the model, in both formats ----------------------------------------------------------------
def build_model_folder(root: Path) -> Path:
    folder = root / "llama-124m"
    if (folder / "model.safetensors").is_file():
        return folder
    tok_dir = root / "tokenizer"
    (root / "corpus.txt").write_text("\n".join([TEXT] * 200), encoding="utf-8")
    train_tokenizer([root / "corpus.txt"], 512, tok_dir, show_progress=False, held_out=[],
                    overwrite=True)
    torch.manual_seed(0)
    Transformer(ModelConfig(**CONFIG)).save_pretrained(folder)
    AutoTokenizer.from_pretrained(tok_dir).save_pretrained(folder)
    return folder


def gguf_file(folder: Path, file_type: str) -> Path:
    path = folder.parent / f"llama-124m-{file_type}.gguf"
    if not path.is_file():
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the tokenizer note: the text check below measures it
            export_gguf(load_source(folder), path, file_type)
    return path


# -- this machine's limits ----------------------------------------------------------------------
def _best(fn, repeat: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def machine_limits(quick: bool) -> dict[str, float]:
    """GEMV read bandwidth: one-row products over 512 MB of fp32 weights (out of every cache),
    through the fastest of torch's kernels (MKL F.linear, oneDNN packed). GEMM peak: 2048^3
    fp32 products, best of both kernels."""
    n_mats, (N, K) = (16 if quick else 64), (2048, 1024)
    mats = [torch.randn(N, K) for _ in range(n_mats)]
    packed = [torch.ops.mkldnn._reorder_linear_weight(w) for w in mats]
    x = torch.randn(1, K)

    def sweep_plain():
        for w in mats:
            F.linear(x, w)

    def sweep_packed():
        for p in packed:
            torch.ops.mkldnn._linear_pointwise(x, p, None, "none", [], "")

    nbytes = n_mats * N * K * 4
    bw = max(nbytes / _best(sweep_plain, 5), nbytes / _best(sweep_packed, 5))
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    pb = torch.ops.mkldnn._reorder_linear_weight(b)
    flops = 2 * 2048**3
    peak = max(flops / _best(lambda: a @ b, 3),
               flops / _best(lambda: torch.ops.mkldnn._linear_pointwise(a, pb, None, "none", [], ""), 3))
    return {"bw": bw, "peak": peak}


def roofline_seconds(n_params: int, wbytes: int, batch: int, prompt: int, gen: int,
                     limits: dict[str, float], step_tokens: int = 2048) -> float:
    """Least time for `batch` sequences of `prompt` + `gen` tokens: the prefill in steps of at
    most `step_tokens` tokens, then `gen - 1` decode steps of `batch` tokens; each step reads
    every weight once and does 2 * params FLOPs per token (attention not counted)."""
    def step(tokens: int) -> float:
        return max(wbytes / limits["bw"], 2 * n_params * tokens / limits["peak"])

    total = prompt * batch
    full, rest = divmod(total, step_tokens)
    prefill = full * step(step_tokens) + (step(rest) if rest else 0.0)
    return prefill + (gen - 1) * step(batch)


# -- AstrAI --------------------------------------------------------------------------------------
def astrai_run(model, batch: int, prompt: int, gen: int, seed: int = 0) -> float:
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(5, CONFIG["vocab_size"], (prompt,), generator=g).tolist() for _ in range(batch)]
    params = SamplingParams(max_tokens=gen, temperature=0, ignore_eos=True)
    with InferenceEngine(model, max_batch_size=batch, enable_prefix_cache=False,
                         kv_cache_tokens=batch * (prompt + gen) + 64) as engine:
        engine.generate_ids(prompts[:1], SamplingParams(max_tokens=2, temperature=0, ignore_eos=True))
        start = time.perf_counter()
        results = engine.generate_ids(prompts, params)
        elapsed = time.perf_counter() - start
    assert all(r.generated_tokens == gen for r in results)
    return elapsed


def astrai_greedy(model, prompt_ids: list[int], n: int) -> list[int]:
    with InferenceEngine(model, max_batch_size=1, enable_prefix_cache=False) as engine:
        r = engine.generate_ids([prompt_ids], SamplingParams(max_tokens=n, temperature=0, ignore_eos=True))
    return r[0].token_ids


# -- llama.cpp -------------------------------------------------------------------------------------
def llama_batched(bin_dir: Path, gguf: Path, threads: int, prompt: int, gen: int,
                  batches: list[int]) -> dict[int, float]:
    """(total seconds, generation seconds) per parallel-sequence count, best of flash attention
    on and off."""
    best: dict[int, tuple[float, float]] = {}
    ctx = max(batches) * (prompt + gen) + 16
    for fa in ("on", "off"):
        out = subprocess.run(
            [str(bin_dir / "llama-batched-bench"), "-m", str(gguf), "-t", str(threads), "-c", str(ctx),
             "-b", "2048", "-ub", "512", "-npp", str(prompt), "-ntg", str(gen),
             "-npl", ",".join(map(str, batches)), "-fa", fa, "--output-format", "jsonl"],
            capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            if line.startswith("{"):
                row = json.loads(line)
                if row["pl"] not in best or row["t"] < best[row["pl"]][0]:
                    best[row["pl"]] = (row["t"], row["t_tg"])
    return best


def llama_bench(bin_dir: Path, gguf: Path, threads: int, prompt: int, gen: int) -> float:
    """tokens/s of one `llama-bench` test (-p prompt -n 0, or -p 0 -n gen)."""
    out = subprocess.run(
        [str(bin_dir / "llama-bench"), "-m", str(gguf), "-t", str(threads), "-p", str(prompt),
         "-n", str(gen), "-r", "3", "-o", "jsonl"], capture_output=True, text=True, check=True).stdout
    rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    return rows[-1]["avg_ts"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(port: int, path: str, body: dict) -> dict:
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", json.dumps(body).encode(),
                                 {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as resp:
        return json.loads(resp.read())


def llama_server_checks(bin_dir: Path, gguf: Path, threads: int, prompt_ids: list[int], n: int,
                        text: str) -> tuple[list[int], list[int]]:
    """llama.cpp's greedy tokens after `prompt_ids`, and its tokenization of `text`."""
    port = _free_port()
    proc = subprocess.Popen([str(bin_dir / "llama-server"), "-m", str(gguf), "-t", str(threads),
                             "--host", "127.0.0.1", "--port", str(port), "-c", "1024", "-np", "1"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                if time.time() > deadline or proc.poll() is not None:
                    raise RuntimeError("llama-server did not start") from None
                time.sleep(0.5)
        out = _post(port, "/completion", {"prompt": prompt_ids, "n_predict": n, "temperature": 0,
                                          "top_k": 1, "ignore_eos": True, "return_tokens": True,
                                          "cache_prompt": False, "samplers": ["top_k"]})
        tokens = _post(port, "/tokenize", {"content": text, "add_special": False})["tokens"]
        return out["tokens"], tokens
    finally:
        proc.terminate()
        proc.wait(timeout=30)


# -- quality of the reduced-precision paths -------------------------------------------------------
def logit_error(ref_model, model, ids: list[int]) -> tuple[float, float, float]:
    """(max |dlogit| / max |logit|, mean |dlogit| / mean |logit|, top-1 agreement) over every
    position of `ids`, teacher-forced."""
    with torch.no_grad():
        a = ref_model(torch.tensor([ids]))[0].double()
        b = model(torch.tensor([ids]))[0].double()
    d = (a - b).abs()
    return (d.max() / a.abs().max()).item(), (d.mean() / a.abs().mean()).item(), \
        (a.argmax(-1) == b.argmax(-1)).double().mean().item()


def int8_kernels(threads: int, quick: bool) -> list[str]:
    """One linear layer (2048 x 768, and the 32000 x 768 lm_head) at 1, 16 and 64 rows through
    each int8 candidate and the fp32 kernels (ours included, though serving uses them up to 8 rows only); ms per call, best of the repeats."""
    import warnings

    from astrai_serve.quantize import Int8Linear, PackedLinear
    lines = ["| kernel | " + " | ".join(f"{s} M={m}" for s in ("2048x768", "lm_head") for m in (1, 16, 64)) + " |",
             "|---|" + "---|" * 6]
    try:
        import torchao
        from torchao.quantization import Int8WeightOnlyConfig, quantize_
    except ImportError:
        torchao = None
    results: dict[str, list[str]] = {}
    for N, K in ((2048, 768), (32000, 768)):
        lin = torch.nn.Linear(K, N, bias=False)
        w = lin.weight.data
        scales = w.abs().amax(1) / 127
        q = torch.round(w / scales[:, None]).to(torch.int8)
        with kernels.disabled():  # torch's kernels alone
            packed, fbgemm = PackedLinear(lin), Int8Linear(lin)
        candidates = {"fp32 F.linear (MKL)": lambda x, w=w: F.linear(x, w),
                      "fp32 oneDNN packed": packed,
                      "int8 fbgemm, per-row 7-bit activations": fbgemm,
                      "int8 weight-only torch._weight_int8pack_mm":
                          lambda x, q=q, s=scales: torch._weight_int8pack_mm(x, q, s)}
        small = kernels.load()
        if small is not None:
            candidates |= {
                "fp32 small-batch kernel (ours; served up to 16 rows)": lambda x, w=w, k=small: k.linear_f32(x, w, None),
                "int8 x int8 small-batch kernel (ours; served up to 8 rows)":
                    lambda x, q=q, s=scales, k=small: k.linear_q8(x, q, s, None)}
        if torchao is not None:
            m = torch.nn.Sequential(torch.nn.Linear(K, N, bias=False))
            m[0].weight.data = w.clone()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                quantize_(m, Int8WeightOnlyConfig())
            candidates[f"int8 weight-only torchao {torchao.__version__}"] = m
        for name, fn in candidates.items():
            for M in (1, 16, 64):
                x = torch.randn(M, K)
                t = _best(lambda fn=fn, x=x: fn(x), 3 if quick else 10)
                results.setdefault(name, []).append(f"{t * 1e3:.2f}")
    if torchao is None:
        lines.append("| (torchao not installed: `uv run --with torchao ...` adds it) |" + " |" * 6)
    lines += [f"| {name} | " + " | ".join(v) + " |" for name, v in results.items()]
    return lines


# -- the run ---------------------------------------------------------------------------------------
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--llama-cpp", type=Path, default=None, help="llama.cpp build's bin folder")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="short smoke run: 32+32 tokens, 1 and 4 sequences")
    parser.add_argument("--work-dir", type=Path, default=None, help="where the model and GGUFs go (kept)")
    parser.add_argument("--fusion-ab", action="store_true",
                        help="also time the unfused serving model (prepare_model fuse=False), F32 at "
                             "1 and 16 sequences and int8 at 1, interleaved with the fused one")
    parser.add_argument("--kernels-ab", action="store_true",
                        help="also time serving without the small-batch kernels (astrai_serve.kernels "
                             "off: oneDNN/fbgemm, torch's RMSNorm, gathered pages and SDPA), F32 at "
                             "1 and 16 sequences and int8 at 1, interleaved")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    prompt, gen, batches, prefill = (32, 32, [1, 4], 128) if args.quick else (128, 128, [1, 16, 64], 512)
    repeat = 1 if args.quick else args.repeat
    work = args.work_dir or Path(tempfile.gettempdir()) / "astrai-bench-llamacpp"
    work.mkdir(parents=True, exist_ok=True)
    folder = build_model_folder(work)
    print(f"CPU: {capability.describe('cpu')}, {os.cpu_count()} logical CPUs, {args.threads} threads; "
          f"torch {torch.__version__}; model {folder}\n{kernels.status()}")

    raw = AutoModel.from_pretrained(folder, dtype="float32")  # F.linear: the layers as trained
    f32 = prepare_model(AutoModel.from_pretrained(folder, dtype="float32"), "none")  # as served
    int8 = prepare_model(AutoModel.from_pretrained(folder, dtype="float32"), "int8")
    n_params = sum(p.numel() for p in raw.parameters())
    limits = machine_limits(args.quick)
    print(f"limits: GEMV read {limits['bw'] / 1e9:.1f} GB/s, fp32 GEMM {limits['peak'] / 1e9:.0f} GFLOP/s; "
          f"{n_params / 1e6:.1f}M parameters, {weight_bytes(f32) / 1e6:.0f} MB F32 / "
          f"{weight_bytes(int8) / 1e6:.0f} MB int8 read per step")

    bin_dir = args.llama_cpp
    ggufs = {}
    if bin_dir is not None:
        ggufs = {"f32": gguf_file(folder, "f32"), "q8_0": gguf_file(folder, "q8_0")}
        if capability.native_bf16("cpu"):
            ggufs["bf16"] = gguf_file(folder, "bf16")
    bf16 = None
    if capability.native_bf16("cpu"):
        bf16 = prepare_model(AutoModel.from_pretrained(folder, dtype="bfloat16"), "none")

    # Interleaved repeats: AstrAI F32 (served), the plain layers, int8, llama.cpp F32 and Q8_0.
    times: dict[str, dict[int, list[float]]] = {}
    engines = {"astrai-f32": f32, "astrai-f32-plain": raw, "astrai-int8": int8}
    if bf16 is not None:
        engines["astrai-bf16"] = bf16
    if args.fusion_ab:
        engines["astrai-f32-unfused"] = prepare_model(AutoModel.from_pretrained(folder, dtype="float32"),
                                                      "none", fuse=False)
        engines["astrai-int8-unfused"] = prepare_model(AutoModel.from_pretrained(folder, dtype="float32"),
                                                       "int8", fuse=False)
    if args.kernels_ab:
        with kernels.disabled():
            for q in ("f32", "int8"):
                engines[f"astrai-{q}-nokernels"] = prepare_model(
                    AutoModel.from_pretrained(folder, dtype="float32"), "none" if q == "f32" else q)
            if bf16 is not None:  # a bf16 model on torch's bf16 ops (oneDNN), as before the kernel
                engines["astrai-bf16-nokernels"] = prepare_model(
                    AutoModel.from_pretrained(folder, dtype="bfloat16"), "none")
    # Batch sizes per engine; the others run batch 1 only.
    sizes = {"astrai-f32": batches, "astrai-f32-plain": batches, "astrai-f32-unfused": batches[:2],
             "astrai-f32-nokernels": batches[:2]}
    for rep in range(repeat):
        for name, model in engines.items():
            with kernels.disabled() if name.endswith("-nokernels") else contextlib.nullcontext():
                for b in sizes.get(name, batches[:1]):
                    times.setdefault(name, {}).setdefault(b, []).append(astrai_run(model, b, prompt, gen))
                times[name].setdefault(-1, []).append(astrai_run(model, 1, prefill, 1))
                times[name].setdefault(-2, []).append(astrai_run(model, 1, prompt, 1))
        for kind, path in ggufs.items():
            pls = batches if kind == "f32" else batches[:1]
            for b, (t, t_tg) in llama_batched(bin_dir, path, args.threads, prompt, gen, pls).items():
                times.setdefault(f"llama-{kind}", {}).setdefault(b, []).append(t)
                if b == 1:
                    times[f"llama-{kind}"].setdefault(-3, []).append(t_tg)
            pp = llama_bench(bin_dir, path, args.threads, prefill, 0)
            times[f"llama-{kind}"].setdefault(-1, []).append(prefill / pp)
        print(f"  run {rep + 1}/{repeat} done", flush=True)

    def best(name: str, b: int) -> float | None:
        ts = times.get(name, {}).get(b)
        return min(ts) if ts else None

    def spread(name: str, b: int) -> str:
        ts = times.get(name, {}).get(b)
        return f"{max(ts) / min(ts):.2f}" if ts and len(ts) > 1 else "-"

    wb = {"f32": weight_bytes(f32), "int8": weight_bytes(int8)}
    print(f"\n## F32 against F32, {args.threads} threads, {prompt} prompt + {gen} generated tokens per "
          f"sequence (best of {repeat}; spread = worst / best)\n")
    print("| parallel sequences | llama.cpp F32 s | AstrAI F32 s | AstrAI / llama.cpp speed | "
          "llama.cpp roofline share | AstrAI roofline share | AstrAI plain F.linear s | spread AstrAI / llama.cpp |")
    print("|---|---|---|---|---|---|---|---|")
    for b in [*batches, -1]:
        p, g = (prefill, 1) if b == -1 else (prompt, gen)
        bb = 1 if b == -1 else b
        roof = roofline_seconds(n_params, wb["f32"], bb, p, g, limits)
        ours, theirs, plain = best("astrai-f32", b), best("llama-f32", b), best("astrai-f32-plain", b)
        label = f"{prefill}-token prefill" if b == -1 else str(b)
        if b == 1:
            ours_tg = (gen - 1) / (ours - best("astrai-f32", -2))
            theirs_tg = best("llama-f32", -3)
            label += f" (decode tok/s: {(theirs_tg and f'{gen / theirs_tg:.0f}') or '-'} / {ours_tg:.0f})"
        ratio = f"{theirs / ours:.2f}" if theirs and ours else "-"
        print(f"| {label} | {(theirs and f'{theirs:.2f}') or '-'} | {ours:.2f} | {ratio} | "
              f"{(theirs and f'{roof / theirs:.0%}') or '-'} | {roof / ours:.0%} | "
              f"{(plain and f'{plain:.2f}') or '-'} | {spread('astrai-f32', b)} / {spread('llama-f32', b)} |")

    print(f"\n## Reduced precision, batch 1, {prompt} + {gen} tokens\n")
    print("| engine | total s | speed vs AstrAI F32 | roofline share |\n|---|---|---|---|")
    f32_1 = best("astrai-f32", 1)
    rows = [("AstrAI int8 (`--quantize int8`)", "astrai-int8", wb["int8"]),
            ("llama.cpp Q8_0", "llama-q8_0", wb["int8"])]  # the same roofline bytes as ours
    if bf16 is not None:
        rows += [("AstrAI bf16 weights (auto here)", "astrai-bf16", weight_bytes(bf16)),
                 ("llama.cpp BF16", "llama-bf16", weight_bytes(bf16))]
    for label, name, nbytes in rows:
        t = best(name, 1)
        if t is None:
            continue
        roof = roofline_seconds(n_params, nbytes, 1, prompt, gen, limits)
        print(f"| {label} | {t:.2f} | {f32_1 / t:.2f}x | {roof / t:.0%} |")

    for flag, suffix, title, off, on in [
            (args.fusion_ab, "unfused", "Fused projections A/B (q/k/v and gate/up as one product each)",
             "unfused", "fused"),
            (args.kernels_ab, "nokernels", "Small-batch kernels A/B (astrai_serve.kernels)", "off", "on")]:
        if not flag:
            continue
        print(f"\n## {title}, {prompt} + {gen} tokens\n")
        print(f"| path | {off} s | {on} s | gain |\n|---|---|---|---|")
        for label, name, b in [("F32", "astrai-f32", batches[0]), ("F32", "astrai-f32", batches[1]),
                               ("int8", "astrai-int8", batches[0]), ("bf16", "astrai-bf16", batches[0])]:
            a, b_ = best(f"{name}-{suffix}", b), best(name, b)
            if a is None or b_ is None:
                continue
            print(f"| {label}, {b} sequence{'s' if b > 1 else ''} | {a:.2f} | {b_:.2f} | {a / b_:.2f}x |")

    ids = AutoTokenizer.from_pretrained(folder).encode(TEXT * 2)[:256]
    print("\n## Quality against F32 (teacher-forced logits on a fixed text, random weights)\n")
    print("| path | max |dlogit| / max |logit| | mean |dlogit| / mean |logit| | top-1 agreement |\n|---|---|---|---|")
    for label, model in [("int8", int8), *([("bf16", bf16)] if bf16 is not None else [])]:
        mx, mean, agree = logit_error(raw, model, ids)
        print(f"| {label} | {mx:.4f} | {mean:.4f} | {agree:.1%} |")

    if bin_dir is not None:
        prompt_ids = ids[:64]
        theirs, their_tokens = llama_server_checks(bin_dir, ggufs["f32"], args.threads, prompt_ids, 32, TEXT)
        ours_greedy = astrai_greedy(raw, prompt_ids, 32)
        same = next((i for i, (a, b) in enumerate(zip(ours_greedy, theirs, strict=False)) if a != b), len(theirs))
        our_tokens = AutoTokenizer.from_pretrained(folder).encode(TEXT)
        print(f"\ngreedy tokens, F32 GGUF in llama-server vs AstrAI: first {same} of {len(theirs)} equal"
              f"{' (all)' if same == len(theirs) else ''}; tokenization of the fixed bilingual text: "
              f"{'equal' if their_tokens == our_tokens else 'DIFFERENT'} ({len(our_tokens)} tokens)")

    print("\n## int8 kernels (ms per call, one layer)\n")
    print("\n".join(int8_kernels(args.threads, args.quick)))


if __name__ == "__main__":
    main()

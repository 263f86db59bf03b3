"""Online serving: N concurrent streaming clients against `astrai serve`, against the offline
`InferenceEngine` on the same workload in the same run.

    uv run python bench/serve_online.py                       # 16 and 64 clients
    uv run python bench/serve_online.py --clients 64 --requests-per-client 3
    uv run python bench/serve_online.py --constrained-share 0,0.125   # with JSON-schema requests

Model: the `small` preset with random weights (seed 0), its vocabulary sized to a byte-level
BPE trained on the synthetic corpus (`astrai data synth`), written as a model folder and served
by `astrai serve` in a subprocess (fp32, --max-batch-size 64).

Workload (after vLLM's serving bench, scaled to a CPU): each client sends
--requests-per-client streaming `/v1/completions` requests one after another; prompts are
random token ids of 32..128 tokens, outputs 32..128 tokens, forced (`ignore_eos`), sampled at
temperature 0.6. Per request the client records time to first token (first streamed text) and
inter-token latency ((last token - first token) / (tokens - 1), tokens counted by the server's
usage, not by text pieces). Output tokens/s counts every generated token over the wall time of
the run.

Offline baseline: the same requests through `InferenceEngine.submit` (text decoding on, as the
server does) by N closed-loop workers, so concurrency is the same and the ratio isolates what
HTTP, SSE and the event loop cost. The server and this script share the machine's CPUs: client
work (SSE parsing for 64 streams) is counted against the server.

With --constrained-share S, that share of the requests (every round(1/S)-th) carries a
`response_format` JSON schema (bench/constrained_decoding.py's LOG_SCHEMA, which no output of
these lengths can complete, so they too run to max_tokens); offline, the same requests carry
the same compiled grammar. Each share is measured separately.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import torch

TEMPERATURE = 0.6


@dataclass
class Sample:
    ttft: float
    itl: float  # mean gap between tokens after the first
    tokens: int


@dataclass
class Report:
    seconds: float
    samples: list[Sample]

    @property
    def tokens(self) -> int:
        return sum(s.tokens for s in self.samples)


def build_model_folder(root: Path) -> Path:
    """The small preset with random weights and a tokenizer trained on the synthetic corpus."""
    from astrai_core.model import Transformer, get_preset
    from astrai_core.tokenizer import AutoTokenizer, train_tokenizer
    from astrai_data import synthesize

    synthesize(root / "corpus", size=1000, seed=0)
    # The synthetic corpus alone yields ~1.5k tokens; random CJK text fills the vocabulary up to
    # the preset's 8192, so every id the model samples decodes to text.
    rng = random.Random(0)
    hanzi = root / "corpus" / "hanzi.txt"
    hanzi.write_text("\n".join("".join(chr(0x4E00 + rng.randrange(6000)) for _ in range(80))
                               for _ in range(4000)), encoding="utf-8")
    train_tokenizer([root / "corpus" / "pretrain.jsonl", hanzi], 8192, root / "tok",
                    show_progress=False)
    tokenizer = AutoTokenizer.from_pretrained(root / "tok")
    torch.manual_seed(0)
    model = Transformer(get_preset("small", vocab_size=max(tokenizer.vocab_size, 8192)))
    folder = root / "small"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


Request = tuple[list[int], int, bool]  # prompt, max_tokens, constrained


def make_requests(n: int, vocab: int, seed: int = 0, share: float = 0.0) -> list[Request]:
    rng = random.Random(seed)
    every = round(1 / share) if share > 0 else 0
    return [([rng.randrange(5, vocab) for _ in range(rng.randint(32, 128))], rng.randint(32, 128),
             every > 0 and i % every == 0) for i in range(n)]


# -- online ---------------------------------------------------------------------------------
def start_server(folder: Path, threads: int) -> tuple[subprocess.Popen, str]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    process = subprocess.Popen(
        [sys.executable, "-m", "astrai_core.cli.main", "serve", str(folder), "--port", str(port),
         "--max-batch-size", "64", "--log-level", "warning"],
        stdout=subprocess.DEVNULL, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return process, url
        except httpx.TransportError:
            pass
        if process.poll() is not None:
            raise RuntimeError("astrai serve exited during startup")
        time.sleep(0.25)
    process.kill()
    raise RuntimeError("astrai serve did not become ready in 180 s")


async def one_request(client: httpx.AsyncClient, url: str, prompt: list[int], max_tokens: int,
                      response_format: dict[str, Any] | None) -> Sample:
    body: dict[str, Any] = {"prompt": prompt, "max_tokens": max_tokens,
                            "temperature": TEMPERATURE, "ignore_eos": True, "stream": True,
                            "stream_options": {"include_usage": True}}
    if response_format is not None:
        body["response_format"] = response_format
    start = time.perf_counter()
    first = last = None
    usage = None
    async with client.stream("POST", f"{url}/v1/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: {"):
                continue
            now = time.perf_counter()
            if '"usage":{' in line:  # the last chunk; the only one worth decoding
                usage = json.loads(line[6:])["usage"]
            elif '"text":""' not in line:
                first = first or now
                last = now
    assert usage is not None and usage["completion_tokens"] == max_tokens, usage
    assert first is not None and last is not None
    return Sample(first - start, (last - first) / max(max_tokens - 1, 1), max_tokens)


def run_async(coro: Any) -> Any:
    """The clients' loop on uvloop, as the server's: on 2 shared CPUs the clients' own overhead
    is taken from the server, so they should be as lean as a real load generator."""
    import uvloop

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(coro)


async def run_clients(url: str, work: list[list[Request]],
                      response_format: dict[str, Any] | None = None) -> Report:
    limits = httpx.Limits(max_connections=len(work) + 1, max_keepalive_connections=len(work))
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:

        async def client_loop(requests: list[Request]) -> list[Sample]:
            return [await one_request(client, url, p, m, response_format if c else None)
                    for p, m, c in requests]

        start = time.perf_counter()
        per_client = await asyncio.gather(*(client_loop(w) for w in work))
        return Report(time.perf_counter() - start, [s for group in per_client for s in group])


# -- offline --------------------------------------------------------------------------------
def run_offline(engine, work: list[list[Request]], grammar: Any = None) -> Report:
    from astrai_serve import SamplingParams

    samples: list[Sample] = []
    lock = threading.Lock()

    def worker(requests: list[Request]) -> None:
        for prompt, max_tokens, constrained in requests:
            params = SamplingParams(max_tokens=max_tokens, temperature=TEMPERATURE,
                                    ignore_eos=True, grammar=grammar if constrained else None)
            result = engine.submit(prompt, params, text=True).wait_completion()
            assert result.generated_tokens == max_tokens
            itl = (result.finish_time - result.first_token_time) / max(max_tokens - 1, 1)
            with lock:
                samples.append(Sample(result.first_token_time - result.arrival_time, itl,
                                      max_tokens))

    threads = [threading.Thread(target=worker, args=(w,)) for w in work]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return Report(time.perf_counter() - start, samples)


# -- report ---------------------------------------------------------------------------------
def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def row(name: str, clients: int, report: Report, ratio: str) -> str:
    ttft = [s.ttft * 1e3 for s in report.samples]
    itl = [s.itl * 1e3 for s in report.samples]
    return (f"| {name} | {clients} | {len(report.samples)} | {pct(ttft, 50):.0f} | "
            f"{pct(ttft, 99):.0f} | {pct(itl, 50):.1f} | {pct(itl, 99):.1f} | "
            f"{len(report.samples) / report.seconds:.2f} | {report.tokens / report.seconds:.0f} |"
            f" {ratio} |")


def best(reports: list[Report]) -> Report:
    return max(reports, key=lambda r: r.tokens / r.seconds)


def measure(n: int, args: argparse.Namespace, url: str, folder: Path, vocab: int,
            share: float = 0.0) -> list[str]:
    """Online and offline runs interleaved --repeat times (a busy spell on a shared machine
    then hits both); the best of each counts."""
    from astrai_serve.api.loader import EngineOptions, load_engine
    from constrained_decoding import LOG_SCHEMA, compiler_for  # it imports this module

    fmt = {"type": "json_schema", "json_schema": {"name": "log", "schema": LOG_SCHEMA}}
    warm_up = [[([5] * 32, 4, share > 0)]]
    online, offline = [], []
    with load_engine(folder, EngineOptions(max_batch_size=64)) as engine:
        grammar = compiler_for(engine).json_schema(LOG_SCHEMA) if share > 0 else None
        run_async(run_clients(url, warm_up, fmt))
        run_offline(engine, warm_up, grammar)
        for rep in range(args.repeat):
            # New prompts each repeat, so the prefix cache never serves a run from the last one.
            requests = make_requests(n * args.requests_per_client, vocab,
                                     seed=1000 * n + rep, share=share)
            work = [requests[i::n] for i in range(n)]
            online.append(run_async(run_clients(url, work, fmt)))
            offline.append(run_offline(engine, work, grammar))
            print(f"    {n} clients: online {online[-1].tokens / online[-1].seconds:.0f}, "
                  f"offline {offline[-1].tokens / offline[-1].seconds:.0f} tokens/s", flush=True)
    on, off = best(online), best(offline)
    ratio = (on.tokens / on.seconds) / (off.tokens / off.seconds)
    tag = f", {share:.3g} constrained" if share > 0 else ""
    return [row(f"astrai serve (HTTP, SSE){tag}", n, on, f"**{ratio:.2f}**"),
            row(f"InferenceEngine (offline){tag}", n, off, "1.00")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=lambda s: [int(x) for x in s.split(",")],
                        default=[16, 64])
    parser.add_argument("--requests-per-client", type=int, default=2)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--repeat", type=int, default=2, help="runs of each; the best counts")
    parser.add_argument("--constrained-share", type=lambda s: [float(x) for x in s.split(",")],
                        default=[0.0], help="shares of JSON-schema requests to measure, "
                        "e.g. 0,0.125")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        folder = build_model_folder(Path(tmp))
        process, url = start_server(folder, args.threads)
        lines = []
        try:
            vocab = json.loads((folder / "config.json").read_text())["vocab_size"]
            print(f"small preset, vocab {vocab}, {args.threads} torch threads, "
                  f"{os.cpu_count()} CPUs; server at {url}", flush=True)
            for share in args.constrained_share:
                for n in args.clients:
                    lines += measure(n, args, url, folder, vocab, share)
        finally:
            process.send_signal(signal.SIGTERM)
            process.wait(60)
    print(f"\nbest of {args.repeat} interleaved runs each")
    print("\n| run | clients | requests | TTFT p50 ms | TTFT p99 ms | ITL p50 ms | ITL p99 ms "
          "| requests/s | output tokens/s | online / offline |\n|---|---|---|---|---|---|---|---|"
          "---|---|")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

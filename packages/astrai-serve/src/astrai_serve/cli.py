"""`astrai serve`, `astrai generate` and `astrai chat`: the sub-commands astrai-serve adds to the
`astrai` CLI (entry-point group `astrai.cli`). Heavy imports (torch, FastAPI) wait until a
command runs, so `astrai --help` stays fast."""

from __future__ import annotations

import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import typer

from astrai_core.cli.aliases import aliased

DEVICE_HELP = "cpu, cuda or cuda:N (default: cuda when available, else cpu)."
DTYPE_HELP = ("auto, float32, bfloat16 or float16 (auto: bfloat16 on a CPU with native bf16, "
              "AVX512-BF16 or AMX; float32 on other CPUs; the stored dtype on GPU).")
QUANTIZE_HELP = ("none or int8: int8 stores every linear layer's weights as 8-bit integers with "
                 "one scale per row (a quarter of fp32's bytes: faster CPU decode, small logit "
                 "error; see docs/benchmarks.md).")
LORA_HELP = ("A LoRA adapter to serve beside the base, as NAME=DIR (repeat for more): DIR is a "
             "PEFT-format adapter folder trained on this base, and a request with "
             "\"model\": NAME uses it. Requests for different adapters share batches.")
MODEL_HELP = ("Model folder with its tokenizer: from `astrai model init`, a training checkpoint, "
              "or a Hugging Face llama/qwen2/qwen3 folder.")

SERVE_HELP = """Serve a model over an OpenAI-compatible HTTP API (chat and text completions, streaming, /v1/models, /health, /metrics).

Examples:

  astrai serve runs/sft/final

  astrai serve runs/sft/final --port 9000 --api-key s3cret --max-batch-size 32

  astrai serve ~/models/Qwen3-0.6B --dtype bfloat16 --kv-cache-memory 8GiB

  astrai serve runs/sft/final --quantize int8

  astrai serve runs/pt/final --lora sql=runs/sql-lora/final --lora chat=runs/chat-lora/final

Binds to 127.0.0.1 unless --host says otherwise. SIGTERM or Ctrl-C stops accepting requests, lets those in flight finish (up to --shutdown-timeout seconds) and exits 0.
"""

GENERATE_HELP = """Complete prompts with a model, streaming to the terminal.

Examples:

  astrai generate runs/pt/final --prompt "Once upon a time"

  astrai generate runs/sft/final --chat -p "What is 2 + 3?" -p "你好" --no-stream

  astrai generate runs/pt/final --prompts-file prompts.txt --max-tokens 64 --temperature 0
"""

CHAT_HELP = """Chat with a model in the terminal, streaming its replies.

The conversation is kept as history; type /reset to clear it and /exit (or Ctrl-D) to leave.

Examples:

  astrai chat runs/sft/final

  astrai chat runs/sft/final --system "Answer in one sentence." --temperature 0.7
"""


def register(app: typer.Typer) -> None:
    app.command("serve", help=SERVE_HELP, cls=aliased({"--max-model-len": "--max-seq-len"}))(serve_cmd)
    app.command("generate", help=GENERATE_HELP)(generate_cmd)
    app.command("chat", help=CHAT_HELP)(chat_cmd)


def serve_cmd(
    model_dir: Path = typer.Argument(..., help=MODEL_HELP, show_default=False),
    host: str = typer.Option("127.0.0.1", help="Address to bind; 0.0.0.0 exposes the server."),
    port: int = typer.Option(8000, help="TCP port."),
    device: str | None = typer.Option(None, help=DEVICE_HELP),
    dtype: str | None = typer.Option(None, help=DTYPE_HELP),
    quantize: str = typer.Option("none", help=QUANTIZE_HELP),
    lora: list[str] = typer.Option([], "--lora", help=LORA_HELP, show_default=False),
    max_batch_size: int = typer.Option(64, help="Sequences generated together at most."),
    kv_cache_tokens: int | None = typer.Option(None, help="KV cache size in tokens."),
    kv_cache_memory: str | None = typer.Option(
        None, help="KV cache size in memory, e.g. 2GiB (instead of --kv-cache-tokens)."),
    max_seq_len: int | None = typer.Option(
        None, help="Context window per request (default: the model's)."),
    api_key: str | None = typer.Option(
        None, envvar="ASTRAI_API_KEY",
        help="Require 'Authorization: Bearer KEY' on /v1/* (or set ASTRAI_API_KEY)."),
    served_model_name: str | None = typer.Option(
        None, help="Model name clients use (default: the folder's name)."),
    max_waiting: int = typer.Option(
        256, help="Sequences that may queue beyond the batch; more get 503 + Retry-After."),
    shutdown_timeout: float = typer.Option(
        30.0, help="Seconds requests in flight may finish after SIGTERM before being aborted."),
    log_level: str = typer.Option("info", help="uvicorn log level."),
    web: bool = typer.Option(True, "--web/--no-web",
                             help="Serve the chat page at / (--no-web: the API alone)."),
) -> None:
    from astrai_serve.adapters import lora_folders
    from astrai_serve.api import ServerConfig, create_app
    from astrai_serve.api.loader import check_model_dir, load_engine
    from astrai_serve.api.server import serve

    check_model_dir(model_dir)  # a wrong folder fails now, not after the server started
    name = served_model_name or model_dir.resolve().name
    options = _engine_options(device, dtype, max_batch_size, kv_cache_tokens, kv_cache_memory,
                              max_seq_len, quantize)
    options.lora = lora_folders(lora, name)
    config = ServerConfig(served_model_name=name, api_key=api_key, max_waiting=max_waiting,
                          web=web)
    _print_banner(name, model_dir, host, port, api_key is not None)
    serve(lambda on_fatal: create_app(lambda: load_engine(model_dir, options), config,
                                      on_load_error=on_fatal),
          host=host, port=port, shutdown_timeout=shutdown_timeout, log_level=log_level)


def _engine_options(device: str | None, dtype: str | None, max_batch_size: int,
                    kv_cache_tokens: int | None, kv_cache_memory: str | None,
                    max_seq_len: int | None, quantize: str = "none") -> Any:
    from astrai_serve.api.loader import EngineOptions, parse_size

    nbytes = parse_size(kv_cache_memory) if kv_cache_memory is not None else None
    return EngineOptions(device=device, dtype=dtype, max_batch_size=max_batch_size,
                         kv_cache_tokens=kv_cache_tokens, kv_cache_bytes=nbytes,
                         max_seq_len=max_seq_len, quantize=quantize)


def _print_banner(name: str, model_dir: Path, host: str, port: int, auth: bool) -> None:
    url = f"http://{'[' + host + ']' if ':' in host else host}:{port}"
    header = ' -H "Authorization: Bearer $ASTRAI_API_KEY"' if auth else ""
    typer.echo(f"Serving '{name}' from {model_dir} at {url}/v1 (OpenAI-compatible); the model "
               f"loads in the background and {url}/health turns 200 when it is ready. Try:\n\n"
               f"  curl {url}/v1/chat/completions{header} -H 'Content-Type: application/json' "
               f"-d '{{\"model\": \"{name}\", \"messages\": [{{\"role\": \"user\", "
               f"\"content\": \"Hello!\"}}]}}'\n", err=False)
    sys.stdout.flush()


def generate_cmd(
    model_dir: Path = typer.Argument(..., help=MODEL_HELP, show_default=False),
    prompt: list[str] = typer.Option([], "--prompt", "-p", help="A prompt; repeat for more.",
                                     show_default=False),
    prompts_file: Path | None = typer.Option(
        None, "--prompts-file", "-f", help="A file of prompts, one per line ('-' reads stdin)."),
    chat: bool = typer.Option(False, "--chat", help="Send each prompt as a user message "
                              "through the chat template (for chat-tuned models)."),
    max_tokens: int = typer.Option(128, help="New tokens per prompt at most."),
    temperature: float = typer.Option(1.0, help="0 is greedy."),
    top_p: float = typer.Option(1.0, help="Nucleus sampling threshold."),
    top_k: int = typer.Option(0, help="Keep the k most likely tokens (0: all)."),
    seed: int | None = typer.Option(None, help="Same seed, same output."),
    stream: bool = typer.Option(True, "--stream/--no-stream",
                                help="Print text as it is generated."),
    device: str | None = typer.Option(None, help=DEVICE_HELP),
    dtype: str | None = typer.Option(None, help=DTYPE_HELP),
    quantize: str = typer.Option("none", help=QUANTIZE_HELP),
) -> None:
    prompts = [*prompt, *_read_prompts(prompts_file)]
    if not prompts:
        raise ValueError("no prompt: give --prompt TEXT or --prompts-file FILE")
    sampling = dict(max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                    seed=seed)
    with _load(model_dir, device, dtype, max(len(prompts), 1), quantize) as engine:
        if stream:
            for i, text in enumerate(prompts):
                _header(i, text, len(prompts))
                _print_stream(_generate(engine, text, chat, True, sampling))
        else:  # all prompts at once: continuous batching serves them together
            results = [_generate(engine, text, chat, False, sampling) for text in prompts]
            for i, (text, result) in enumerate(zip(prompts, results, strict=True)):
                _header(i, text, len(prompts))
                typer.echo(result.wait_completion().text)


def _read_prompts(path: Path | None) -> list[str]:
    if path is None:
        return []
    text = sys.stdin.read() if str(path) == "-" else path.read_text(encoding="utf-8")
    return [line for line in text.splitlines() if line.strip()]


def _load(model_dir: Path, device: str | None, dtype: str | None, max_batch_size: int,
          quantize: str = "none") -> Any:
    from astrai_serve.api.loader import EngineOptions, load_engine

    typer.echo(f"loading {model_dir} ...", err=True)
    return load_engine(model_dir, EngineOptions(device=device, dtype=dtype,
                                                max_batch_size=max_batch_size, quantize=quantize))


def _generate(engine: Any, text: str, chat: bool, stream: bool, sampling: dict[str, Any]) -> Any:
    """A stream of text pieces (stream) or a `GenerateResult` (not)."""
    from astrai_serve import SamplingParams

    if chat:
        ids = engine.tokenizer.apply_chat_template([{"role": "user", "content": text}],
                                                   add_generation_prompt=True, tokenize=True)
    else:
        ids = engine.tokenizer.encode(text)
    result = engine.submit(ids, SamplingParams(**sampling), text=True)
    return engine.stream_text(result) if stream else result


def _header(i: int, text: str, total: int) -> None:
    if total > 1:
        shown = text if len(text) <= 60 else text[:57] + "..."
        typer.echo(f"{'' if i == 0 else chr(10)}--- [{i + 1}/{total}] {shown}")


def _print_stream(pieces: Iterable[str]) -> str:
    out = []
    for piece in pieces:
        sys.stdout.write(piece)
        sys.stdout.flush()
        out.append(piece)
    sys.stdout.write("\n")
    sys.stdout.flush()
    return "".join(out)


def chat_cmd(
    model_dir: Path = typer.Argument(..., help=MODEL_HELP, show_default=False),
    system: str | None = typer.Option(None, help="A system prompt opening the conversation."),
    max_tokens: int = typer.Option(512, help="New tokens per reply at most."),
    temperature: float = typer.Option(0.7, help="0 is greedy."),
    top_p: float = typer.Option(0.9, help="Nucleus sampling threshold."),
    top_k: int = typer.Option(0, help="Keep the k most likely tokens (0: all)."),
    seed: int | None = typer.Option(None, help="Same seed, same replies."),
    device: str | None = typer.Option(None, help=DEVICE_HELP),
    dtype: str | None = typer.Option(None, help=DTYPE_HELP),
    quantize: str = typer.Option("none", help=QUANTIZE_HELP),
) -> None:
    sampling = dict(max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                    seed=seed)
    with _load(model_dir, device, dtype, 1, quantize) as engine:
        typer.echo(f"Chatting with {model_dir.resolve().name}. /reset clears the history, "
                   "/exit leaves.")
        ChatSession(engine, system, sampling).run()


class ChatSession:
    """The REPL: read a line, answer it with the whole conversation as context."""

    def __init__(self, engine: Any, system: str | None, sampling: dict[str, Any]) -> None:
        self.engine = engine
        self.opening = [{"role": "system", "content": system}] if system else []
        self.history: list[dict[str, str]] = list(self.opening)
        self.sampling = sampling

    def run(self) -> None:
        while (line := self._read()) is not None:
            command = line.strip()
            if command in ("/exit", "/quit"):
                break
            if command == "/reset":
                self.history = list(self.opening)
                typer.echo("(history cleared)")
            elif command.startswith("/"):
                typer.echo("unknown command; /reset clears the history, /exit leaves")
            elif command:
                self._answer(line)

    @staticmethod
    def _read() -> str | None:
        try:
            return input("you> ")
        except EOFError:
            typer.echo()
            return None

    def _answer(self, text: str) -> None:
        self.history.append({"role": "user", "content": text})
        ids = self._fit()
        if ids is None:
            self.history.pop()
            typer.echo("(that message alone is longer than the context window; shorten it)")
            return
        from astrai_serve import SamplingParams

        result = self.engine.submit(ids, SamplingParams(**self.sampling), text=True)
        sys.stdout.write("assistant> ")
        try:
            reply = _print_stream(self.engine.stream_text(result))
        except KeyboardInterrupt:  # stop this reply, keep the session
            typer.echo("\n(interrupted)")
            reply = result.text
        self.history.append({"role": "assistant", "content": reply})

    def _fit(self) -> list[int] | None:
        """The conversation's prompt ids, dropping the oldest turns (never the system prompt
        or the new message) until it leaves room to answer; None if it never does."""
        window = self.engine.scheduler.max_seq_len
        tokenizer = self.engine.tokenizer
        while True:
            ids = tokenizer.apply_chat_template(self.history, add_generation_prompt=True,
                                                tokenize=True)
            if len(ids) < window:
                return list(ids)
            first = len(self.opening)
            if len(self.history) - first <= 1:
                return None
            del self.history[first]

"""`astrai generate` and `astrai chat` (in process, stdin fed), and the one-line errors of
`astrai serve` on a folder it cannot serve."""

from __future__ import annotations

import subprocess
import sys

import pytest
from api_helpers import model_folder
from typer.testing import CliRunner

from astrai_core.cli.main import app
from astrai_serve import InferenceEngine, SamplingParams

# float32 as the in-process engine's model: "auto" is bf16 on a CPU with native bf16, whose
# greedy tokens may differ from fp32's (the bf16 path has its own tests in test_quantize.py).
GREEDY = ["--temperature", "0", "--max-tokens", "10", "--dtype", "float32"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, hf_folder, tokenizer):
    return model_folder(tmp_path_factory.mktemp("cli") / "tiny", hf_folder, tokenizer)


@pytest.fixture(scope="module")
def engine(model, tokenizer):
    with InferenceEngine(model, tokenizer) as eng:
        yield eng


def greedy(engine, ids: list[int], max_tokens: int = 10) -> str:
    params = SamplingParams(temperature=0, max_tokens=max_tokens)
    return engine.submit(ids, params, text=True).wait_completion().text


def chat_reply(engine, tokenizer, messages: list[dict]) -> str:
    return greedy(engine, tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                                        tokenize=True))


def invoke(*args: str, input: str | None = None):
    result = CliRunner().invoke(app, [str(a) for a in args], input=input)
    assert result.exit_code == 0, (result.output, result.exception)
    return result


def test_generate_streams_the_completion(model_dir, engine, tokenizer):
    result = invoke("generate", model_dir, "--prompt", "The quick brown", *GREEDY)
    expected = greedy(engine, tokenizer.encode("The quick brown"))
    assert result.stdout.endswith(expected + "\n")


def test_generate_reads_a_prompts_file_and_batches_without_streaming(model_dir, engine,
                                                                      tokenizer, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("The quick brown\n\n小模型\n", encoding="utf-8")
    out = invoke("generate", model_dir, "-f", prompts, "--no-stream", "--chat", *GREEDY).stdout
    assert "--- [1/2] The quick brown" in out and "--- [2/2] 小模型" in out
    for prompt in ("The quick brown", "小模型"):
        assert chat_reply(engine, tokenizer, [{"role": "user", "content": prompt}]) in out


def test_generate_without_a_prompt_is_refused(model_dir):
    result = CliRunner().invoke(app, ["generate", str(model_dir)])
    assert isinstance(result.exception, ValueError) and "no prompt" in str(result.exception)


def test_chat_keeps_history_and_reset_forgets_it(model_dir, engine, tokenizer):
    def replies(lines: list[str]) -> list[str]:
        out = invoke("chat", model_dir, *GREEDY, input="\n".join(lines) + "\n").stdout
        return [part.split("\n")[0] for part in out.split("assistant> ")[1:]]

    hello = {"role": "user", "content": "Hello"}
    again = {"role": "user", "content": "Hi again"}
    first = chat_reply(engine, tokenizer, [hello])
    with_history = chat_reply(engine, tokenizer,
                              [hello, {"role": "assistant", "content": first}, again])
    assert replies(["Hello", "Hi again", "/exit"]) == [first, with_history]
    assert replies(["Hello", "/reset", "Hi again"]) == [first, chat_reply(engine, tokenizer,
                                                                           [again])]


def test_chat_commands_and_an_overlong_message(model_dir):
    out = invoke("chat", model_dir, *GREEDY, input="/help\n" + "fox " * 400 + "\n/exit\n").stdout
    assert "unknown command" in out and "longer than the context window" in out


def test_serve_without_a_tokenizer_fails_in_one_line(tmp_path, hf_folder):
    result = subprocess.run([sys.executable, "-m", "astrai_core.cli.main", "serve",
                             str(hf_folder)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert "has no tokenizer" in result.stderr and "astrai tokenizer train" in result.stderr
    assert "Traceback" not in result.stderr

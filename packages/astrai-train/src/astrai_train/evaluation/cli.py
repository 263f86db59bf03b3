"""`astrai eval`: the sub-command astrai-train adds to the `astrai` CLI (entry-point group
`astrai.cli`). Heavy imports (torch, lm-eval) wait until the command runs."""

from __future__ import annotations

from pathlib import Path

import typer

HELP = """Score one or more models on lm-evaluation-harness tasks, on the perplexity of your own text, and on the quickstart's held-out set, English and Chinese side by side.

Examples:

  astrai eval runs/sft/final --tasks arc_easy,hellaswag --limit 200

  astrai eval runs/a/final runs/b/final --tasks mmlu,cmmlu,ceval-valid --num-fewshot 5

  astrai eval runs/pt/final --tasks ppl:wiki.jsonl,ppl:corpus.h5

  astrai eval runs/quickstart/final --tasks heldout:runs/quickstart/corpus

  astrai eval runs/sft/final --tasks my_task.yaml      (your own harness task over local files)

A task is an lm-eval task or group name, a task YAML file, `ppl:FILE` (.txt, .jsonl with "text" and an optional "lang", or a prepared .h5: perplexity and bits per byte) or `heldout:FOLDER` (eval_sft/dpo/grpo.jsonl: loss, accuracy, preference, reward). Rows are task, metric and language; columns are the models. OUT/results.json holds every number and the settings, OUT/results.md the table.

Nothing is downloaded: lm-eval tasks read their data from the local Hugging Face cache or from files; harness tasks need the eval extra (pip install 'astrai-train[eval]').
"""


def eval_cmd(
    model_dirs: list[Path] = typer.Argument(..., help="Model folders (ours, training checkpoints, Hugging Face llama/qwen2/qwen3), one column each.", show_default=False),
    tasks: list[str] = typer.Option(..., "--tasks", help="Tasks, comma-separated or repeated (see above).", show_default=False),
    out: Path = typer.Option(Path("runs/eval"), "--out", help="Folder of results.json and results.md."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace the results already in OUT."),
    limit: int | None = typer.Option(None, "--limit", min=1, help="Records per task at most (harness: documents; heldout: per language)."),
    num_fewshot: int | None = typer.Option(None, "--num-fewshot", min=0, help="Few-shot examples for harness tasks (default: each task's own, else 0)."),
    batch_size: int = typer.Option(64, "--batch-size", min=1, help="Requests the engine runs together at most."),
    max_tokens: int = typer.Option(24, "--max-tokens", min=1, help="Tokens generated per held-out reply (heldout tasks; harness tasks set their own)."),
    scoring: str | None = typer.Option(None, "--scoring", help="How harness log-likelihoods are computed: engine (the serving engine, contexts through its prefix cache) or model (direct forwards, each shared context once). Both give the same numbers; default: engine."),
    device: str | None = typer.Option(None, "--device", help="cpu, cuda or cuda:N (default: cuda when available, else cpu)."),
    dtype: str | None = typer.Option(None, "--dtype", help="auto, float32, bfloat16 or float16 (auto: bfloat16 on a CPU with native bf16 or the stored dtype on GPU, float32 on other CPUs)."),
    seed: int = typer.Option(0, "--seed", help="Seed of few-shot sampling and of any sampled generation."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show progress over requests."),
) -> None:
    from rich.console import Console

    from astrai_train.evaluation.progress import RequestProgress
    from astrai_train.evaluation.results import RESULTS_FILE, results_table
    from astrai_train.evaluation.runner import EvalOptions, run_eval

    if scoring is not None and scoring not in ("engine", "model"):
        raise ValueError(f"--scoring {scoring}: choose engine or model")
    target = out / RESULTS_FILE
    if target.exists() and not overwrite:
        raise FileExistsError(f"{target} exists; pass --overwrite to replace it, or another --out")
    options = EvalOptions(tasks=list(tasks), device=device, dtype=dtype, limit=limit,
                          num_fewshot=num_fewshot, seed=seed, batch_size=batch_size,
                          max_tokens=max_tokens, scoring=scoring)
    console = Console()
    report = run_eval(list(model_dirs), options, RequestProgress(Console(stderr=True), progress))
    path = report.write(out)
    console.print(results_table(report))
    console.print(f"results: {path}", soft_wrap=True, highlight=False)


def register(app: typer.Typer) -> None:
    app.command("eval", help=HELP, no_args_is_help=True)(eval_cmd)

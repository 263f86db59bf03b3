"""Building the synthetic bilingual corpus: pretraining text, chats, preference pairs, GRPO
prompts and held-out evaluation files, all deterministic from the seed."""

from __future__ import annotations

from random import Random
from typing import Any

from astrai_data.synth import lexicon
from astrai_data.synth.facts import ChitChat, Color, Opposite, Sound, Translate
from astrai_data.synth.tasks import (
    LANGS,
    QA,
    Arithmetic,
    Compare,
    Count,
    Key,
    Split,
    Successor,
    Task,
)

TASKS: dict[str, Task] = {t.name: t for t in (
    Arithmetic(), Compare(), Successor(), Count(), Color(), Sound(), Opposite(), Translate(),
    ChitChat())}
WEIGHTS = {"arithmetic": 30, "compare": 8, "successor": 7, "count": 7, "color": 12, "sound": 10,
           "opposite": 10, "translate": 10, "chat": 6}
NUMERIC = ("arithmetic", "compare", "successor")  # one number answers: scored by value
# Answers a program checks (GRPO's prompts and rewards): the numeric tasks and counting, whose
# answer is the whole sequence (the quickstart's SFT model counts on but stops at the wrong number).
VERIFIABLE = (*NUMERIC, "count")
QA_LABELS = {"en": ("Q: ", "A: "), "zh": ("问：", "答：")}
ROLE_LABELS = {"en": ("User: ", "Assistant: "), "zh": ("用户：", "助手：")}
JOIN = {"en": " ", "zh": ""}


def pick_task(rng: Random, names: tuple[str, ...] | None = None) -> Task:
    names = names or tuple(WEIGHTS)
    return TASKS[rng.choices(names, [WEIGHTS[n] for n in names])[0]]


def sample_qa(rng: Random, lang: str, split: Split, names: tuple[str, ...] | None = None) -> QA:
    return pick_task(rng, names).sample(rng, lang, split)


def chat(rng: Random, split: Split = "train", max_turns: int = 3) -> list[dict[str, str]]:
    """1..max_turns question/answer turns, mostly in one language, sometimes a system prompt."""
    lang = rng.choice(LANGS)
    messages = []
    if rng.random() < 0.3:
        messages.append({"role": "system", "content": rng.choice(lexicon.SYSTEM_PROMPTS[lang])})
    for _ in range(rng.randint(1, max_turns)):
        turn_lang = lang if rng.random() < 0.9 else ("zh" if lang == "en" else "en")
        qa = sample_qa(rng, turn_lang, split)
        messages += [{"role": "user", "content": qa.prompt},
                     {"role": "assistant", "content": qa.reply}]
    return messages


def _facts_doc(rng: Random, lang: str, split: Split) -> str:
    names = tuple(n for n in WEIGHTS if n != "chat")
    return JOIN[lang].join(sample_qa(rng, lang, split, names).reply
                           for _ in range(rng.randint(4, 10)))


def _qa_doc(rng: Random, lang: str, split: Split) -> str:
    q, a = QA_LABELS[lang]
    pairs = [sample_qa(rng, lang, split) for _ in range(rng.randint(3, 6))]
    return "\n".join(f"{q}{p.prompt}\n{a}{p.reply}" for p in pairs)


def _dialog_doc(rng: Random, lang: str, split: Split) -> str:
    user, assistant = ROLE_LABELS[lang]
    lines = []
    for _ in range(rng.randint(2, 4)):
        qa = sample_qa(rng, lang, split)
        lines += [f"{user}{qa.prompt}", f"{assistant}{qa.reply}"]
    return "\n".join(lines)


def _glossary_doc(rng: Random, lang: str, split: Split) -> str:
    pairs = rng.sample(lexicon.WORDS, rng.randint(5, 10))
    return "\n".join(f"{en} = {zh}" if lang == "en" else f"{zh} = {en}" for en, zh in pairs)


def _table_doc(rng: Random, lang: str, split: Split) -> str:
    """Consecutive sums (or differences) of one number: only keys of the split."""
    task = TASKS["arithmetic"]
    op = rng.choice("+-")
    keys = [k for k in task.split_keys(split) if k[1] == op]
    a = rng.choice(sorted({k[0] for k in keys}))
    return JOIN[lang].join(task.reply(k, lang) for k in keys if k[0] == a)


DOC_KINDS = {"facts": (_facts_doc, 35), "qa": (_qa_doc, 35), "dialog": (_dialog_doc, 15),
             "glossary": (_glossary_doc, 5), "table": (_table_doc, 10)}


def pretrain_doc(rng: Random, split: Split = "train") -> str:
    kinds = list(DOC_KINDS)
    builder = DOC_KINDS[rng.choices(kinds, [DOC_KINDS[k][1] for k in kinds])[0]][0]
    return builder(rng, rng.choice(LANGS), split)


def _malformed(rng: Random, reply: str, lang: str) -> str:
    """A reply a model should not give: a non-answer, a cut-off one, or a stutter."""
    style = rng.choice(("dont_know", "cut", "stutter"))
    if style == "dont_know":
        return lexicon.DONT_KNOW[lang]
    if style == "cut" and len(reply) > 4:
        return reply[:rng.randint(2, len(reply) - 2)].rstrip() or lexicon.DONT_KNOW[lang]
    words = reply.split(" ") if lang == "en" else list(reply)
    i = rng.randrange(len(words))
    return JOIN[lang].join(words[:i + 1] + [words[i]] * 2 + words[i + 1:])


def rejected_reply(rng: Random, task: Task, key: Key, lang: str) -> str:
    """What DPO learns to avoid: a wrong answer, the right one in the other language, or a
    malformed one (a non-answer, cut short, a stutter)."""
    chosen = task.reply(key, lang)
    roll = rng.random()
    if roll < 0.5:
        rejected = task.wrong_reply(key, lang, rng)
    elif roll < 0.75:
        rejected = task.reply(key, "zh" if lang == "en" else "en")
    else:
        rejected = _malformed(rng, chosen, lang)
    if rejected == chosen:  # e.g. a chit-chat reply that has no wrong variant
        rejected = lexicon.DONT_KNOW[lang]
    return rejected


def preference(rng: Random) -> dict[str, Any]:
    """A DPO record: chosen is the canonical reply; rejected is wrong, in the other language, or
    malformed. The prompt is a string or, sometimes, a chat ending with the question."""
    lang = rng.choice(LANGS)
    task = pick_task(rng)
    key = task.sample_key(rng, "train")
    prompt = task.prompt(key, lang, rng, "train")
    chosen = task.reply(key, lang)
    rejected = rejected_reply(rng, task, key, lang)
    if rng.random() < 0.3:
        messages = chat(rng, "train", max_turns=1)
        return {"messages": [*messages, {"role": "user", "content": prompt}],
                "chosen": chosen, "rejected": rejected}
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


def grpo_prompt(rng: Random, split: Split = "train") -> dict[str, str]:
    qa = sample_qa(rng, rng.choice(LANGS), split, VERIFIABLE)
    assert qa.reference is not None
    return {"prompt": qa.prompt, "answer": qa.reference, "lang": qa.lang, "task": qa.task}


# -- held-out evaluation sets: distinct items, balanced over tasks, per language ----------------
def held_out_items(task: Task, lang: str) -> list[tuple[Key, str]]:
    """Every distinct held-out question of a task: its held-out keys (numeric tasks) or its
    held-out phrasings (fact tasks), as (key, prompt)."""
    return [(key, prompt) for key in task.split_keys("eval")
            for prompt in dict.fromkeys(task.prompts(key, lang, "eval"))]


def balanced(pools: dict[str, list[Any]], total: int) -> list[Any]:
    """Up to `total` items drawn evenly from the pools: every pool gets the same share, a pool
    with fewer items gives all it has and the rest goes to the others (each pool pre-shuffled)."""
    taken = dict.fromkeys(pools, 0)
    open_pools = [name for name in pools if pools[name]]
    remaining = total
    while remaining > 0 and open_pools:
        share = max(remaining // len(open_pools), 1)
        for name in list(open_pools):
            n = min(share, len(pools[name]) - taken[name], remaining)
            taken[name] += n
            remaining -= n
            if taken[name] == len(pools[name]):
                open_pools.remove(name)
            if remaining == 0:
                break
    return [item for name in pools for item in pools[name][:taken[name]]]


def _held_out_pools(seed: int, lang: str, names: tuple[str, ...], what: str) -> dict[str, list]:
    pools = {}
    for name in names:
        items = held_out_items(TASKS[name], lang)
        Random(f"{seed}:{what}:{name}:{lang}").shuffle(items)
        pools[name] = items
    return pools


def eval_chats(seed: int, per_lang: int) -> list[dict[str, Any]]:
    """Single-turn held-out chats, `per_lang` per language, spread evenly over the tasks."""
    rows = []
    for lang in LANGS:
        for name, (key, prompt) in _tagged(_held_out_pools(seed, lang, tuple(TASKS), "chat"),
                                           per_lang):
            rows.append({"messages": [{"role": "user", "content": prompt},
                                      {"role": "assistant", "content": TASKS[name].reply(key, lang)}],
                         "task": name, "lang": lang})
    return rows


def eval_prompts(seed: int, per_lang: int) -> list[dict[str, str]]:
    """Held-out verifiable prompts (numeric tasks and counting) with their answers, as GRPO's file."""
    rows = []
    for lang in LANGS:
        for name, (key, prompt) in _tagged(_held_out_pools(seed, lang, VERIFIABLE, "grpo"), per_lang):
            rows.append({"prompt": prompt, "answer": TASKS[name].reference(key), "lang": lang,
                         "task": name})
    return rows


def eval_preferences(seed: int, per_lang: int) -> list[dict[str, Any]]:
    """Held-out preference pairs (held-out questions, rejected replies as in training)."""
    rows = []
    for lang in LANGS:
        rng = Random(f"{seed}:dpo-rejected:{lang}")
        for name, (key, prompt) in _tagged(_held_out_pools(seed, lang, tuple(TASKS), "dpo"),
                                           per_lang):
            task = TASKS[name]
            rows.append({"prompt": prompt, "chosen": task.reply(key, lang),
                         "rejected": rejected_reply(rng, task, key, lang), "task": name,
                         "lang": lang})
    return rows


def _tagged(pools: dict[str, list], total: int) -> list[tuple[str, Any]]:
    return balanced({name: [(name, item) for item in items] for name, items in pools.items()},
                    total)

"""Building the synthetic bilingual corpus: pretraining text, chats, preference pairs, GRPO
prompts and held-out evaluation files, all deterministic from the seed."""

from __future__ import annotations

from random import Random
from typing import Any

from astrai_data.synth import lexicon
from astrai_data.synth.facts import ChitChat, Color, Opposite, Sound, Translate
from astrai_data.synth.tasks import LANGS, QA, Arithmetic, Compare, Count, Split, Successor, Task

TASKS: dict[str, Task] = {t.name: t for t in (
    Arithmetic(), Compare(), Successor(), Count(), Color(), Sound(), Opposite(), Translate(),
    ChitChat())}
WEIGHTS = {"arithmetic": 30, "compare": 8, "successor": 7, "count": 7, "color": 12, "sound": 10,
           "opposite": 10, "translate": 10, "chat": 6}
NUMERIC = ("arithmetic", "compare", "successor")  # verifiable answers: GRPO prompts
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


def preference(rng: Random) -> dict[str, Any]:
    """A DPO record: chosen is the canonical reply; rejected is wrong, in the other language, or
    malformed. The prompt is a string or, sometimes, a chat ending with the question."""
    lang = rng.choice(LANGS)
    task = pick_task(rng)
    key = task.sample_key(rng, "train")
    prompt = task.prompt(key, lang, rng, "train")
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
    if rng.random() < 0.3:
        messages = chat(rng, "train", max_turns=1)
        return {"messages": [*messages, {"role": "user", "content": prompt}],
                "chosen": chosen, "rejected": rejected}
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


def grpo_prompt(rng: Random, split: Split = "train") -> dict[str, str]:
    qa = sample_qa(rng, rng.choice(LANGS), split, NUMERIC)
    assert qa.reference is not None
    return {"prompt": qa.prompt, "answer": qa.reference, "lang": qa.lang, "task": qa.task}


def eval_chat(rng: Random) -> dict[str, Any]:
    """A single-turn held-out chat (tasks drawn uniformly, so each is measured)."""
    qa = sample_qa(rng, rng.choice(LANGS), "eval", (rng.choice(tuple(TASKS)),))
    return {"messages": [{"role": "user", "content": qa.prompt},
                         {"role": "assistant", "content": qa.reply}],
            "task": qa.task, "lang": qa.lang}

"""Fact tasks over the fixed lexicon: colors, animal sounds, opposites, translation, chit-chat.

Their keys are few, so the held-out split uses question templates that training never uses.
"""

from __future__ import annotations

from random import Random
from typing import Any, ClassVar

from astrai_data.synth import lexicon
from astrai_data.synth.tasks import Key, Split, Task


class Color(Task):
    name = "color"
    templates: ClassVar = {
        "en": {"train": ["What color is {x}?", "What is the color of {x}?", "What colour is {x}?",
                         "Which color is {x}?", "Do you know the color of {x}?",
                         "Name the color of {x}."],
               "eval": ["Tell me the color of {x}.", "What color does {x} have?"]},
        "zh": {"train": ["{x}是什么颜色？", "{x}是什么颜色的？", "{x}是哪种颜色？",
                         "你知道{x}是什么颜色吗？", "说说{x}的颜色。", "{x}的颜色是哪种？",
                         "请告诉我{x}的颜色。", "{x}有什么颜色？"],
               "eval": ["{x}的颜色是什么？", "{x}是啥颜色？"]},
    }

    def instances(self) -> list[Key]:
        return [(i,) for i in range(len(lexicon.COLORS))]

    def fields(self, key: Key, lang: str) -> dict[str, Any]:
        en, zh, color_en, color_zh = lexicon.COLORS[key[0]]
        return {"x": en if lang == "en" else zh, "c": color_en if lang == "en" else color_zh}

    def reply_template(self, key: Key, lang: str) -> str:
        return "{x} is {c}." if lang == "en" else "{x}是{c}的。"

    def wrong_reply(self, key: Key, lang: str, rng: Random) -> str:
        return self.reply(key, lang, c=self.fields(self.wrong_key(key, rng), lang)["c"])


class Sound(Task):
    name = "sound"
    templates: ClassVar = {
        "en": {"train": ["What does a {x} say?", "What sound does a {x} make?",
                         "What noise does a {x} make?", "How does a {x} go?",
                         "What does the {x} say?"],
               "eval": ["How does a {x} sound?", "Tell me the sound a {x} makes."]},
        "zh": {"train": ["{x}怎么叫？", "{x}是怎么叫的？", "{x}会怎么叫？", "{x}发出什么声音？",
                         "{x}的叫声怎么样？", "{x}的叫声是怎样的？", "说说{x}的叫声。",
                         "{x}是什么叫声？"],
               "eval": ["{x}的叫声是什么？", "{x}叫起来是什么声音？"]},
    }

    def instances(self) -> list[Key]:
        return [(i,) for i in range(len(lexicon.SOUNDS))]

    def fields(self, key: Key, lang: str) -> dict[str, Any]:
        en, zh, sound_en, sound_zh = lexicon.SOUNDS[key[0]]
        return {"x": en if lang == "en" else zh, "s": sound_en if lang == "en" else sound_zh}

    def reply_template(self, key: Key, lang: str) -> str:
        return "A {x} says {s}." if lang == "en" else "{x}{s}叫。"

    def wrong_reply(self, key: Key, lang: str, rng: Random) -> str:
        return self.reply(key, lang, s=self.fields(self.wrong_key(key, rng), lang)["s"])


class Opposite(Task):
    name = "opposite"
    templates: ClassVar = {
        "en": {"train": ["What is the opposite of {w}?", 'What is the opposite of "{w}"?',
                         "What's the opposite of {w}?", "Opposite of {w}?",
                         "Which word is the opposite of {w}?"],
               "eval": ["Give me the opposite of {w}.", "Tell me the opposite of {w}."]},
        "zh": {"train": ["{w}的反义词是什么？", "“{w}”的反义词是什么？", "{w}的反义词是啥？",
                         "“{w}”的反面是什么？", "说出{w}的反义词。", "和{w}相反的词是什么？",
                         "{w}的相反是什么？"],
               "eval": ["{w}的反义词是哪个词？", "“{w}”反过来是什么？"]},
    }

    def instances(self) -> list[Key]:
        return [(i, flip) for i in range(len(lexicon.OPPOSITES)) for flip in (False, True)]

    def fields(self, key: Key, lang: str) -> dict[str, Any]:
        en, zh, opp_en, opp_zh = lexicon.OPPOSITES[key[0]]
        pair = (en, opp_en) if lang == "en" else (zh, opp_zh)
        word, opposite = reversed(pair) if key[1] else pair
        return {"w": word, "o": opposite}

    def reply_template(self, key: Key, lang: str) -> str:
        return "The opposite of {w} is {o}." if lang == "en" else "{w}的反义词是{o}。"

    def wrong_reply(self, key: Key, lang: str, rng: Random) -> str:
        return self.reply(key, lang, o=self.fields(self.wrong_key(key, rng), lang)["o"])


class Translate(Task):
    """Key (word index, direction): direction "to_zh" asks for the Chinese word."""

    name = "translate"
    templates: ClassVar = {
        "en": {"train": ['How do you say "{en}" in Chinese?|What does "{zh}" mean in English?',
                         'What is "{en}" in Chinese?|What is "{zh}" in English?',
                         'Say "{en}" in Chinese.|Say "{zh}" in English.',
                         'What is the Chinese for "{en}"?|What is the English for "{zh}"?',
                         'Put "{en}" into Chinese.|Put "{zh}" into English.',
                         'Write "{en}" in Chinese, please.|Write "{zh}" in English, please.'],
               "eval": ['Translate "{en}" into Chinese.|Translate "{zh}" into English.',
                        'How would you write "{en}" in Chinese?|'
                        'How would you write "{zh}" in English?']},
        "zh": {"train": ["“{en}”是什么意思？|“{zh}”用英语怎么说？",
                         "“{en}”用中文怎么说？|“{zh}”的英文是什么？",
                         "“{en}”的中文是什么？|“{zh}”英语怎么说？",
                         "请把“{en}”译成中文。|请把“{zh}”译成英文。",
                         "“{en}”翻译过来是什么？|“{zh}”的英语单词是什么？"],
               "eval": ["把“{en}”翻译成中文。|把“{zh}”翻译成英语。",
                        "“{en}”翻成中文是什么？|“{zh}”翻成英文是什么？"]},
    }

    def instances(self) -> list[Key]:
        return [(i, d) for i in range(len(lexicon.WORDS)) for d in ("to_zh", "to_en")]

    def fields(self, key: Key, lang: str) -> dict[str, Any]:
        en, zh = lexicon.WORDS[key[0]]
        return {"en": en, "zh": zh}

    def prompts(self, key: Key, lang: str, split: Split) -> list[str]:
        pairs = [t.split("|") for t in self.templates[lang][split]]
        return [(to_zh if key[1] == "to_zh" else to_en).format(**self.fields(key, lang))
                for to_zh, to_en in pairs]

    def reply_template(self, key: Key, lang: str) -> str:
        if lang == "en":
            return 'The Chinese word for "{en}" is "{zh}".' if key[1] == "to_zh" \
                else '"{zh}" means "{en}".'
        return "“{en}”的意思是“{zh}”。" if key[1] == "to_zh" else "“{zh}”的英语是“{en}”。"

    def wrong_reply(self, key: Key, lang: str, rng: Random) -> str:
        target = "zh" if key[1] == "to_zh" else "en"
        return self.reply(key, lang, **{target: self.fields(self.wrong_key(key, rng), lang)[target]})


class ChitChat(Task):
    name = "chat"
    templates: ClassVar = {}

    def instances(self) -> list[Key]:
        return [(i,) for i in range(len(lexicon.CHAT_EN))]

    def fields(self, key: Key, lang: str) -> dict[str, Any]:
        return {}

    def prompts(self, key: Key, lang: str, split: Split) -> list[str]:
        train, held_out, _ = (lexicon.CHAT_EN if lang == "en" else lexicon.CHAT_ZH)[key[0]]
        return list(train if split == "train" else held_out)

    def reply_template(self, key: Key, lang: str) -> str:
        return (lexicon.CHAT_EN if lang == "en" else lexicon.CHAT_ZH)[key[0]][2]

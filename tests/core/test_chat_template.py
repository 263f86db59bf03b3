"""ChatTemplate and AutoTokenizer.apply_chat_template, checked against transformers' own rendering."""

from __future__ import annotations

import json

import pytest
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from astrai_core.tokenizer import AutoTokenizer, ChatTemplate, ChatTemplateError
from astrai_core.tokenizer.chat_template import DEFAULT_CHAT_TEMPLATE

LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
                   "<|end_header_id|>", "<|eot_id|>"]
CHATML_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

LLAMA3 = """{{- bos_token }}
{%- for message in messages %}
    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' }}
    {{- message['content'] | trim }}
    {{- '<|eot_id|>' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}
{%- endif %}
"""

# A default system prompt, tools as JSON, tool calls, loop controls and a namespace.
SYSTEM_AND_TOOLS = """{%- set ns = namespace(turns=0) %}
{%- if messages[0]['role'] == 'system' %}
    {%- set system = messages[0]['content'] %}
    {%- set rest = messages[1:] %}
{%- else %}
    {%- set system = 'You are Astra, a careful assistant.' %}
    {%- set rest = messages %}
{%- endif %}
<|im_start|>system
{{ system }}
{%- if tools %}

# Tools
<tools>
{%- for tool in tools %}
{{ tool | tojson }}
{%- endfor %}
</tools>
{%- endif %}
<|im_end|>
{% for message in rest %}
    {%- if message['role'] == 'system' %}
        {%- continue %}
    {%- endif %}
    {%- if message['role'] not in ['user', 'assistant', 'tool'] %}
        {{- raise_exception('Unknown role: ' + message['role']) }}
    {%- endif %}
    {%- set ns.turns = ns.turns + 1 %}
<|im_start|>{{ message['role'] }}
{% if message.tool_calls is defined %}
    {%- for call in message.tool_calls %}
<tool_call>{{ call.function | tojson(indent=2, sort_keys=true) }}</tool_call>
    {%- endfor %}
{%- else %}
{{ message['content'] }}
{%- endif %}
<|im_end|>
{% endfor %}
{%- if add_generation_prompt %}
<|im_start|>assistant
{% endif %}"""

TOOLS = [{
    "type": "function",
    "function": {
        "name": "add",
        "description": "Add a & b; returns <sum>. 加法",
        "parameters": {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
                       "required": ["a", "b"]},
    },
}]

CHAT = [
    {"role": "system", "content": "Answer briefly."},
    {"role": "user", "content": "What is 2 + 3? 请用中文回答。"},
    {"role": "assistant", "content": "  五 (5) 😀  "},
    {"role": "user", "content": "Thanks!\n\nAnd 10 - 4?"},
]
TOOL_CHAT = [
    {"role": "user", "content": "add 2 and 3"},
    {"role": "assistant", "content": None,
     "tool_calls": [{"type": "function", "function": {"name": "add", "arguments": {"b": 3, "a": 2}}}]},
    {"role": "tool", "content": "5"},
    {"role": "assistant", "content": "2 + 3 = 5"},
]


def byte_level_tokenizer(specials: list[str]) -> Tokenizer:
    """A byte-level tokenizer without merges: every text round-trips, no training needed."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tokenizer = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(specials)
    return tokenizer


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """One folder both libraries load: ChatML and Llama 3 special tokens, bos and eos named."""
    path = tmp_path_factory.mktemp("chat_tokenizer")
    tokenizer = byte_level_tokenizer(CHATML_SPECIALS + LLAMA3_SPECIALS)
    named = {"bos_token": "<|begin_of_text|>", "eos_token": "<|endoftext|>"}
    AutoTokenizer(tokenizer, special_tokens=named).save_pretrained(path)
    return path


def both(folder, template: str) -> tuple[AutoTokenizer, transformers.PreTrainedTokenizerBase]:
    ours = AutoTokenizer.from_pretrained(folder)
    ours.set_chat_template(template)
    theirs = transformers.AutoTokenizer.from_pretrained(folder)
    theirs.chat_template = template
    return ours, theirs


@pytest.mark.parametrize("template", [CHATML, LLAMA3, SYSTEM_AND_TOOLS, DEFAULT_CHAT_TEMPLATE],
                         ids=["chatml", "llama3", "system_and_tools", "astrai_default"])
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_rendering_equals_transformers(folder, template, add_generation_prompt):
    ours, theirs = both(folder, template)
    expected = theirs.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=add_generation_prompt)
    got = ours.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=add_generation_prompt)
    assert got == expected
    ids = theirs.apply_chat_template(CHAT, tokenize=True, return_dict=False,
                                     add_generation_prompt=add_generation_prompt)
    assert ours.apply_chat_template(CHAT, add_generation_prompt=add_generation_prompt) == list(ids)


@pytest.mark.parametrize("template", [SYSTEM_AND_TOOLS, DEFAULT_CHAT_TEMPLATE],
                         ids=["system_and_tools", "astrai_default"])
def test_tools_and_tool_calls_render_as_transformers(folder, template):
    ours, theirs = both(folder, template)
    expected = theirs.apply_chat_template(TOOL_CHAT, tools=TOOLS, tokenize=False, add_generation_prompt=True)
    got = ours.apply_chat_template(TOOL_CHAT, tools=TOOLS, tokenize=False)
    assert got == expected
    assert "Add a & b; returns <sum>. 加法" in got  # tojson neither HTML-escapes nor ASCII-escapes


def test_default_system_prompt_applies_only_without_a_system_message(folder):
    ours, theirs = both(folder, SYSTEM_AND_TOOLS)
    no_system = CHAT[1:]
    assert ours.apply_chat_template(no_system, tokenize=False) == theirs.apply_chat_template(
        no_system, tokenize=False, add_generation_prompt=True)
    assert "You are Astra" in ours.apply_chat_template(no_system, tokenize=False)
    assert "You are Astra" not in ours.apply_chat_template(CHAT, tokenize=False)


def test_extra_variables_reach_the_template_and_override_special_tokens(folder):
    ours, theirs = both(folder, "{{ bos_token }}|{{ greeting }}|{{ messages[0].content }}")
    kwargs = {"greeting": "你好", "bos_token": "[BOS]"}
    expected = theirs.apply_chat_template(CHAT, tokenize=False, **kwargs)
    assert ours.apply_chat_template(CHAT, tokenize=False, **kwargs) == expected == "[BOS]|你好|Answer briefly."


def test_default_template_is_chatml_with_optional_system_prompt():
    template = ChatTemplate.default()
    chat = [{"role": "user", "content": "hi"}]
    assert template.render(chat) == "<|im_start|>user\nhi<|im_end|>\n"
    assert template.render(chat, system_prompt="Be kind.", add_generation_prompt=True) == (
        "<|im_start|>system\nBe kind.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")
    # The conversation's own system message wins over the system_prompt argument.
    own = [{"role": "system", "content": "Own."}, *chat]
    assert template.render(own, system_prompt="Ignored.").startswith("<|im_start|>system\nOwn.<|im_end|>")


def test_default_template_reads_text_parts_of_structured_content():
    chat = [{"role": "user", "content": [{"type": "text", "text": "look "}, {"type": "image"},
                                         {"type": "text", "text": "here"}]}]
    assert ChatTemplate.default().render(chat) == "<|im_start|>user\nlook here<|im_end|>\n"


def test_messages_may_be_pydantic_models_and_none_fields_are_dropped():
    pydantic = pytest.importorskip("pydantic")

    class Message(pydantic.BaseModel):
        role: str
        content: str | None = None

    rendered = ChatTemplate.from_string("{% for m in messages %}{{ m.role }}:{{ m.content is defined }};"
                                        "{% endfor %}").render([Message(role="user", content="x"),
                                                                Message(role="assistant")])
    assert rendered == "user:True;assistant:False;"


def test_generation_tag_from_hugging_face_templates_is_accepted():
    template = ChatTemplate.from_string(
        "{% for m in messages %}{% if m.role == 'assistant' %}{% generation %}{{ m.content }}"
        "{% endgeneration %}{% else %}[{{ m.content }}]{% endif %}{% endfor %}")
    assert template.render([{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]) == "[q]a"


def test_syntax_error_names_the_template_and_line():
    with pytest.raises(ChatTemplateError) as info:
        ChatTemplate.from_string("{% for m in messages %}\n{{ m.content }\n{% endfor %}", name="my template")
    message = str(info.value)
    assert "my template" in message and "syntax error at line 2" in message


def test_set_chat_template_rejects_bad_syntax_at_once(folder):
    tokenizer = AutoTokenizer.from_pretrained(folder)
    with pytest.raises(ChatTemplateError, match="syntax error"):
        tokenizer.set_chat_template("{% if %}")
    assert tokenizer.chat_template == DEFAULT_CHAT_TEMPLATE  # unchanged after the failure


def test_raise_exception_names_the_template_the_message_and_the_reason():
    template = ChatTemplate.from_string(SYSTEM_AND_TOOLS, name="tools template")
    chat = [{"role": "user", "content": "hi"}, {"role": "robot", "content": "beep"}]
    with pytest.raises(ChatTemplateError) as info:
        template.render(chat)
    message = str(info.value)
    assert message.startswith("tools template (line ")
    assert 'message 1 {"role": "robot", "content": "beep"}' in message
    assert "the template rejected it: Unknown role: robot" in message
    assert not isinstance(info.value.__cause__, ChatTemplateError)  # the jinja2 error is kept as cause


def test_unknown_role_in_default_template_is_one_clear_error():
    with pytest.raises(ChatTemplateError) as info:
        ChatTemplate.default().render([{"role": "user", "content": "a"}, {"role": "narrator", "content": "b"}])
    message = str(info.value)
    assert "default chat template" in message and "message 1" in message
    assert "unknown role 'narrator'" in message and "system, user, assistant and tool" in message


def test_runtime_error_inside_template_is_wrapped():
    template = ChatTemplate.from_string("{{ messages[0].content + 1 }}", name="adder")
    with pytest.raises(ChatTemplateError, match=r"adder \(line 1\) failed on message 0 .*TypeError"):
        template.render([{"role": "user", "content": "x"}])


def test_undefined_use_is_wrapped():
    template = ChatTemplate.from_string("{{ messages[0].missing.deeper }}")
    with pytest.raises(ChatTemplateError, match="used something undefined"):
        template.render([{"role": "user", "content": "x"}])


def test_sandbox_blocks_python_internals():
    template = ChatTemplate.from_string("{{ messages.__class__.__mro__[1].__subclasses__() }}")
    with pytest.raises(ChatTemplateError, match="sandbox|undefined"):
        template.render([{"role": "user", "content": "x"}])
    mutating = ChatTemplate.from_string("{{ messages.append(1) }}")
    with pytest.raises(ChatTemplateError, match="sandbox forbids"):
        mutating.render([{"role": "user", "content": "x"}])


@pytest.mark.parametrize(("messages", "error", "text"), [
    ("hello", TypeError, "list of dicts"),
    ([["user", "hi"]], TypeError, "message 0 is a list"),
    ([{"content": "no role"}], ChatTemplateError, "message 0 .* has no 'role'"),
])
def test_malformed_messages_are_rejected_clearly(messages, error, text):
    with pytest.raises(error, match=text):
        ChatTemplate.default().render(messages)


def test_empty_template_and_empty_conversation_are_rejected(folder):
    with pytest.raises(ChatTemplateError, match="empty"):
        ChatTemplate.from_string("   ")
    with pytest.raises(ValueError, match="at least one message"):
        AutoTokenizer.from_pretrained(folder).apply_chat_template([])


def test_tojson_options_match_python_json():
    value = {"b": [1, "é"], "a": "<&>"}
    template = ChatTemplate.from_string("{{ messages[0].data | tojson(indent=2, sort_keys=true) }}")
    rendered = template.render([{"role": "user", "data": value}])
    assert rendered == json.dumps(value, indent=2, sort_keys=True, ensure_ascii=False)

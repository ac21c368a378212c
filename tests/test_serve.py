"""`python -m infer.serve` with SmolLM2, driven by the official `openai` client: chat and completions, streamed
and not; 32 concurrent requests each equal to the same request alone; a client leaving mid-stream frees its slot;
every error case; prompt log-probabilities equal to `infer --perplexity`'s scoring; a shared system prompt served
from the prefix cache, counted by /metrics; SIGTERM drains."""

import concurrent.futures
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import pytest

openai = pytest.importorskip("openai")

KEY = "test-key"
SLOTS, MAX_LEN, WAITING = 4, 128, 32


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(smollm2_checkpoint):
    """`python -m infer.serve` on SmolLM2. Time (~60 s): the server compiles every shape before it says ready, as it
    does for users: 3 prefill shapes (--max-batch-tokens 128), 3 decode row counts and 4 prompt scorers.
    (Speculation is served by test_tools' server, on a model that compiles in a fraction of the time.)"""
    yield from start_server(smollm2_checkpoint, ["--slots", str(SLOTS), "--max-len", str(MAX_LEN), "--max-waiting",
                                                 str(WAITING), "--api-key", KEY, "--name", "smol",
                                                 "--max-batch-tokens", "128"])


def start_server(checkpoint, options: list[str]):
    """A fixture's body: `python -m infer.serve CHECKPOINT OPTIONS` on a free port, once it says ready; yields
    (process, base URL, its stderr lines so far and to come) and kills it after."""
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "infer.serve", str(checkpoint), "--port", str(port), *options],
                               stderr=subprocess.PIPE, text=True)
    lines = []
    for line in process.stderr:
        lines.append(line)
        if "ready:" in line:
            break
    else:
        pytest.fail(f"the server did not start: {''.join(lines)}")
    threading.Thread(target=lambda: lines.extend(process.stderr), daemon=True).start()
    yield process, f"http://127.0.0.1:{port}", lines
    if process.poll() is None:
        process.kill()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[1] + "/v1", api_key=KEY, max_retries=0, timeout=120)


def http(server, path, body=None, key=KEY, raw=None):
    """(status, JSON body, headers) of a request sent without the client, so that anything can be sent."""
    data = raw if raw is not None else None if body is None else json.dumps(body).encode()
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    request = urllib.request.Request(server[1] + path, data=data, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read()), response.headers
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read()), e.headers


def idle(server):
    """Wait until no slot is busy and nothing waits; returns /health's body."""
    for _ in range(200):
        status, body, _ = http(server, "/health", key=None)
        if status == 200 and body["busy"] == body["waiting"] == 0:
            return body
        time.sleep(0.05)
    pytest.fail(f"the server never went idle: {body}")


def test_chat_and_completions_streamed_and_not(server, client):
    assert [m.id for m in client.models.list()] == ["smol"]
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    chat = client.chat.completions.create(model="smol", messages=messages, max_tokens=24, temperature=0)
    assert "Paris" in chat.choices[0].message.content and chat.choices[0].finish_reason == "stop"
    assert chat.usage.completion_tokens > 0 and chat.usage.prompt_tokens > 10
    stream = client.chat.completions.create(model="smol", messages=messages, max_tokens=24, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == chat.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].usage.completion_tokens == chat.usage.completion_tokens

    text = client.completions.create(model="smol", prompt="The capital of France is", max_tokens=12, temperature=0)
    assert text.choices[0].finish_reason == "length" and text.usage.completion_tokens == 12
    streamed = client.completions.create(model="smol", prompt="The capital of France is", max_tokens=12,
                                         temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == text.choices[0].text
    stopped = client.completions.create(model="smol", prompt="The capital of France is", max_tokens=12,
                                        temperature=0, stop=[text.choices[0].text.split()[1]])
    assert stopped.choices[0].finish_reason == "stop"
    assert text.choices[0].text.startswith(stopped.choices[0].text) and len(stopped.choices[0].text) < len(
        text.choices[0].text)


def test_logprobs_and_echo(server, client, smollm2_checkpoint):
    chat = client.chat.completions.create(model="smol", messages=[{"role": "user", "content": "Hi"}], max_tokens=6,
                                          temperature=0, logprobs=True, top_logprobs=3)
    for entry in chat.choices[0].logprobs.content:  # greedy: the chosen token is the most likely
        assert len(entry.top_logprobs) == 3 and entry.top_logprobs[0].logprob == pytest.approx(entry.logprob)
    text = "The licence gives you the freedom to share and change the software."
    echo = client.completions.create(model="smol", prompt=text, max_tokens=0, echo=True, logprobs=1)
    choice = echo.choices[0]
    assert choice.text == text and choice.logprobs.token_logprobs[0] is None
    served = -np.mean(choice.logprobs.token_logprobs[1:])
    # the same text through `infer --perplexity`'s scoring, one window holding all of it
    from llama_jax.checkpoints import load_params, open_checkpoint
    from llama_jax.generation import perplexity
    from llama_jax.text import encoder_for

    checkpoint = open_checkpoint(smollm2_checkpoint)
    ids = encoder_for(checkpoint).tokenizer.encode(text).ids
    direct = perplexity(load_params(checkpoint), ids, checkpoint.config, context=len(ids), stride=len(ids),
                        batch_size=1)
    assert direct.tokens == len(ids) - 1 == len(choice.logprobs.token_logprobs) - 1
    assert abs(served - direct.nll) < 1e-4


def prompts_for(i):
    words = "one two three four five six seven eight nine ten".split()
    return " ".join(words[:1 + i % 10]) + f" and then {i}"


def test_32_concurrent_requests_each_equal_to_it_alone(server, client):
    """16 different requests (greedy and seeded sampling, prompts of 4 to 16 tokens, 2 to 10 new tokens), each sent
    twice at once: 32 concurrent requests over 4 slots, each equal to the request sent alone. Time (~15 s): the 16
    requests alone, then the 32 at once."""
    requests = [dict(model="smol", prompt=prompts_for(i), max_tokens=2 + (i * 5) % 9,
                     **(dict(temperature=0) if i % 2 else dict(temperature=0.9, top_p=0.9, seed=i))) for i in range(16)]
    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        together = list(pool.map(lambda r: client.completions.create(**r), requests + requests))
    alone = [client.completions.create(**r) for r in requests]
    for r, a, b in zip(requests + requests, together, alone + alone, strict=True):
        assert a.choices[0].text == b.choices[0].text, r
        assert a.usage.completion_tokens == b.usage.completion_tokens
    assert idle(server)["slots"] == SLOTS


def test_a_client_leaving_mid_stream_frees_its_slot(server, client):
    stream = client.completions.create(model="smol", prompt="Once upon a time", max_tokens=100, temperature=0,
                                       stream=True)
    next(iter(stream))
    stream.close()
    idle(server)
    done = client.completions.create(model="smol", prompt="Once upon a time", max_tokens=3, temperature=0)
    assert done.usage.completion_tokens == 3


@pytest.mark.parametrize("body, status, match", [
    (None, 400, "JSON"),
    ({"model": "smol", "prompt": "x", "max_tokens": "many"}, 400, "max_tokens"),
    ({"model": "smol", "prompt": 5}, 400, "prompt"),
    ({"model": "smol", "prompt": "x", "max_tokens": MAX_LEN}, 400, "maximum context length"),
    ({"model": "smol", "prompt": "x", "n": 17}, 400, "n: "),
    ({"model": "smol", "prompt": "x", "logit_bias": {"50000": 5}}, 400, "logit_bias: token ids must be in"),
    ({"model": "smol", "prompt": "x", "logit_bias": {"12": 101}}, 400, "logit_bias: the value for 12"),
    ({"model": "smol", "prompt": "x", "logit_bias": {"a": 1}}, 400, "logit_bias: 'a' is not a token id"),
    ({"model": "smol", "prompt": "x", "presence_penalty": 3}, 400, "presence_penalty"),
    ({"model": "smol", "prompt": "x", "stop_token_ids": [-1]}, 400, "stop_token_ids"),
    ({"model": "smol", "prompt": "x", "response_format": {"type": "xml"}}, 400, "response_format: type 'xml'"),
    ({"model": "smol", "prompt": "x", "response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "frobnicate"}}}}, 400, "response_format: this schema is not supported"),
    ({"model": "smol", "prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    ({"model": "smol", "prompt": "x", "logprobs": 9}, 400, "logprobs"),
    ({"model": "smol", "prompt": [99999999]}, 400, "token ids"),
    ({"model": "other", "prompt": "x"}, 404, "does not exist"),
    ({"model": "smol", "messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function", "function": {
        "name": "f"}}]}, 400, "tools: this model's chat template does not render tools"),
    ({"model": "smol", "messages": []}, 400, "messages"),
])
def test_bad_requests_get_openai_errors(server, body, status, match):
    path = "/v1/chat/completions" if body and "messages" in body else "/v1/completions"
    got, error, _ = http(server, path, body, raw=b"{not json" if body is None else None)
    assert got == status and match in error["error"]["message"], error
    assert set(error["error"]) >= {"message", "type", "code"}


def test_api_key_unknown_fields_and_a_full_queue(server):
    assert http(server, "/v1/models", key=None)[0] == 401
    assert http(server, "/v1/models", key="wrong")[0] == 401
    assert http(server, "/health", key=None)[0] == 200
    ok, body, _ = http(server, "/v1/completions", {"model": "smol", "prompt": "x", "max_tokens": 2, "whatever": 1})
    assert ok == 200 and body["usage"]["completion_tokens"] == 2
    burst = {"model": "smol", "prompt": "Count: one two", "max_tokens": 12, "temperature": 0}
    with concurrent.futures.ThreadPoolExecutor(SLOTS + WAITING + 16) as pool:
        replies = list(pool.map(lambda _: http(server, "/v1/completions", burst), range(SLOTS + WAITING + 16)))
    refused = [r for r in replies if r[0] == 429]
    assert refused and all(r[2]["Retry-After"] for r in refused)
    served = [r for r in replies if r[0] != 429]
    assert all(r[0] == 200 for r in served) and len({r[1]["choices"][0]["text"] for r in served}) == 1
    assert idle(server)["status"] == "ok"


def test_tokenizer_endpoints_as_vllm_has_them(server):
    """lm-evaluation-harness's remote tokenizer: /tokenizer_info, /tokenize, /detokenize (behind the key too)."""
    status, info, _ = http(server, "/tokenizer_info")
    assert status == 200 and info["eos_token"] and "{%" in info["chat_template"]
    _, tokenized, _ = http(server, "/tokenize", {"prompt": "Hello world", "add_special_tokens": False})
    assert tokenized["count"] == len(tokenized["tokens"]) == 2
    assert http(server, "/detokenize", {"tokens": tokenized["tokens"]})[1]["prompt"] == "Hello world"
    assert http(server, "/detokenize", {"tokens": [10 ** 9]})[0] == 400
    assert http(server, "/tokenize", {"prompt": "x"}, key=None)[0] == 401


def scrape(server) -> dict[str, float]:
    """GET /metrics (no key needed, as for /health), parsed by prometheus_client's own parser."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(server[1] + "/metrics", timeout=60) as response:
        text = response.read().decode()
    return {s.name: s.value for family in text_string_to_metric_families(text) for s in family.samples}


def test_a_shared_system_prompt_hits_the_prefix_cache_and_metrics_count_it(server, client):
    system = "You are a careful assistant who answers in one short sentence. " * 6
    before = scrape(server)
    answers = [client.chat.completions.create(model="smol", max_tokens=6, temperature=0, messages=[
        {"role": "system", "content": system}, {"role": "user", "content": question}]).choices[0].message.content
        for question in ("What is 2 + 2?", "Name a colour.", "What is 2 + 2?")]
    assert answers[0] == answers[2]  # the same request, the second time from cached blocks, answers the same
    after = scrape(server)
    moved = {name: after[name] - before.get(name, 0) for name in after}
    assert moved["llama_jax_prefix_cache_hit_tokens_total"] >= 2 * 64  # the system prompt is ~70 tokens
    assert moved["llama_jax_prefix_cache_queried_tokens_total"] > moved["llama_jax_prefix_cache_hit_tokens_total"]
    assert 0 < moved["llama_jax_prompt_tokens_total"] and moved["llama_jax_generation_tokens_total"] >= 3
    assert moved["llama_jax_time_to_first_token_seconds_count"] == 3
    assert moved["llama_jax_inter_token_latency_seconds_count"] >= 3
    health = idle(server)
    assert after["llama_jax_kv_blocks_used"] >= 0 and health["blocks_used"] == 0 and health["blocks_cached"] > 0


def test_n_logit_bias_penalties_and_stop_token_ids(server, client):
    """n choices (streams of one seed, reproducible; streamed the same), logit_bias banning and forcing a token,
    a frequency penalty changing greedy text, stop_token_ids ending a choice, vLLM's top_k/min_p accepted."""
    def tokenize(text):
        return http(server, "/tokenize", {"prompt": text, "add_special_tokens": False})[1]["tokens"]

    ask = dict(model="smol", prompt="one two one two one two one two", max_tokens=10, temperature=0)
    base = client.completions.create(**ask).choices[0].text
    first = tokenize(base)[0]
    banned = client.completions.create(**ask, logit_bias={str(first): -100}).choices[0].text
    assert banned and first not in tokenize(banned)[:1]
    banana = tokenize(" banana")[0]
    forced = client.completions.create(**ask, logit_bias={str(banana): 100}).choices[0].text
    assert forced == http(server, "/detokenize", {"tokens": [banana] * 10})[1]["prompt"]
    assert client.completions.create(**ask, frequency_penalty=2.0).choices[0].text != base
    stopped = client.completions.create(**ask, extra_body={"stop_token_ids": [first]})
    assert (stopped.choices[0].text, stopped.choices[0].finish_reason, stopped.usage.completion_tokens) == (
        "", "stop", 1)

    sampled = dict(model="smol", messages=[{"role": "user", "content": "Name a colour."}], max_tokens=8,
                   temperature=1.0, seed=11, extra_body={"top_k": 40, "min_p": 0.01})
    four = [c.message.content for c in client.chat.completions.create(**sampled, n=4).choices]
    assert four == [c.message.content for c in client.chat.completions.create(**sampled, n=4).choices]
    assert len(set(four)) > 1 and client.chat.completions.create(**sampled).choices[0].message.content == four[0]
    streamed = {0: "", 1: ""}
    for chunk in client.chat.completions.create(**sampled, n=2, stream=True):
        for choice in chunk.choices:
            streamed[choice.index] += choice.delta.content or ""
    assert [streamed[0], streamed[1]] == four[:2]
    assert idle(server)["blocks_used"] == 0


SCHEMAS = [  # nested objects, arrays, enums, required fields
    {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                      "country": {"type": "object", "properties": {
                                          "name": {"type": "string", "maxLength": 20},
                                          "population": {"type": "integer"}}, "required": ["name", "population"]}},
     "required": ["city", "country"], "additionalProperties": False},
    {"type": "object", "properties": {"colours": {"type": "array", "items": {"enum": ["red", "green", "blue"]},
                                                  "minItems": 1, "maxItems": 3}},
     "required": ["colours"], "additionalProperties": False},
    {"type": "object", "properties": {"answer": {"enum": ["yes", "no"]}, "confidence": {"type": "number"}},
     "required": ["answer", "confidence"], "additionalProperties": False},
]


def test_structured_outputs_always_parse_beside_free_requests(server, client):
    """JSON mode and three JSON schemas (llguidance masks every token), streamed and not, while unconstrained
    requests run in the same steps; a pydantic model through the openai client's parse helper."""
    import jsonschema
    import pydantic

    ask = dict(model="smol", max_tokens=60, temperature=0.7, seed=3,
               messages=[{"role": "user", "content": "Tell me about Paris in JSON."}])
    formats = [{"type": "json_object"}] + [{"type": "json_schema", "json_schema": {"name": f"s{i}", "schema": schema,
                                                                                   "strict": True}}
                                           for i, schema in enumerate(SCHEMAS)]

    def constrained(response_format, stream):
        if not stream:
            return client.chat.completions.create(**ask, response_format=response_format).choices[0].message.content
        return "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
            **ask, response_format=response_format, stream=True) if c.choices)

    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        free = [pool.submit(client.completions.create, model="smol", prompt="Once upon a time", max_tokens=40)
                for _ in range(2)]
        texts = list(pool.map(lambda job: constrained(*job), [(f, s) for f in formats for s in (False, True)]))
        assert all(f.result().choices[0].text for f in free)
    for i, text in enumerate(texts):
        value = json.loads(text)
        assert isinstance(value, dict)
        if i >= 2:
            jsonschema.validate(value, SCHEMAS[i // 2 - 1])

    class City(pydantic.BaseModel):
        name: str = pydantic.Field(max_length=20)
        river: str = pydantic.Field(max_length=20)
        founded: int

    parsed = client.chat.completions.parse(**ask, response_format=City).choices[0].message.parsed
    assert isinstance(parsed, City)


@pytest.mark.parametrize("args, message", [
    (["--kv-tokens", "100"], "--kv-tokens 100 is below --max-len 128"),
    (["--block-size", "48"], "--block-size 48 must divide --max-len 128"),
    (["--max-batch-tokens", "0"], "--max-batch-tokens must be >= 1"),
])
def test_bad_pool_settings_are_one_line_errors_at_start_up(args, message, capsys):
    from infer.serve.__main__ import parse_args

    with pytest.raises(SystemExit) as exit_info:
        parse_args(["--max-len", "128", *args])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and f"error: {message}" in err.splitlines()[-1], err


def test_sigterm_lets_requests_in_flight_finish(server, client):
    process = server[0]
    result = concurrent.futures.ThreadPoolExecutor(1).submit(
        client.completions.create, model="smol", prompt="Once upon a time", max_tokens=40, temperature=0)
    while http(server, "/health", key=None)[1]["busy"] == 0:
        time.sleep(0.01)
    os.kill(process.pid, signal.SIGTERM)
    assert result.result(timeout=120).usage.completion_tokens == 40
    assert process.wait(timeout=60) == 0
    assert "stopped" in "".join(server[2])


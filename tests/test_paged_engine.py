"""The paged engine: requests joining a running batch, each with its own settings, equal the batch Engine on that
request alone, whether chunked, served from the prefix cache or preempted; blocks are all free at the end; only
busy rows are computed; the scheduler serves, cancels and refuses."""

import threading

import numpy as np
import pytest
from conftest import load_fixture

from llama_jax.generation import (Engine, PagedEngine, QueueFull, Request, SamplingParams, Scheduler, check_sizes)

MAX_LEN = 64
REQUESTS = [  # (prompt length, max_new_tokens, sampling, seed): greedy and sampled rows mixed in one batch
    (5, 20, SamplingParams(), 0),
    (11, 12, SamplingParams(temperature=0.8, top_p=0.9), 3),
    (3, 15, SamplingParams(temperature=1.2, top_k=5), 7),
    (17, 8, SamplingParams(), 0),
    (1, 10, SamplingParams(temperature=0.7, min_p=0.1), 11),
    (30, 25, SamplingParams(), 0),
]


@pytest.fixture(scope="module")
def gqa():
    return load_fixture("gqa")


def requests_of(ref):
    pool = np.concatenate([ref["gen_prompt"], ref["tokens"].ravel(), ref["train_tokens"].ravel()]).tolist()
    return [Request(pool[5 * i:5 * i + n], new, sampling, seed)
            for i, (n, new, sampling, seed) in enumerate(REQUESTS)]


ENGINES = {}  # one batch Engine per sampling setting (its compiled programs reused across requests)


def solo(config, params, request, stop_ids=()):
    """The request through the batch Engine (dense cache), alone."""
    if request.sampling not in ENGINES:
        ENGINES[request.sampling] = Engine(params, config, max_len=MAX_LEN, sampling=request.sampling)
    result = ENGINES[request.sampling].generate([request.prompt], max_new_tokens=request.max_new_tokens,
                                                stop_ids=stop_ids, seed=request.seed)
    return result.completions[0].tokens


def serve(engine, requests, add_every=2):
    """Add a request every `add_every` steps (so requests join running batches); returns each one's tokens and
    finish reason."""
    sids, tokens, reasons, steps = {}, {}, {}, 0
    while len(reasons) < len(requests):
        if len(sids) < len(requests) and steps % add_every == 0:
            sids[engine.add(requests[len(sids)])] = len(sids)
        for out in engine.step():
            tokens.setdefault(sids[out.sid], []).extend(t.id for t in out.tokens)
            if out.finish_reason:
                reasons[sids[out.sid]] = out.finish_reason
        steps += 1
    return [tokens[i] for i in range(len(requests))], [reasons[i] for i in range(len(requests))]


def all_free(engine) -> bool:
    return not engine.running and not engine.waiting and engine.blocks.available() == engine.blocks.usable


def test_requests_joining_a_running_batch_equal_each_alone(gqa):
    """Prompts of 17 and 30 tokens go in chunks over 3+ steps (8 prompt tokens a step) while others decode."""
    config, params, ref = gqa
    requests = requests_of(ref)
    stop = solo(config, params, requests[0])[6]  # request 0 (greedy) stops early at its 7th token
    engine = PagedEngine(params, config, slots=3, max_len=MAX_LEN, block_size=4, max_batch_tokens=8,
                         stop_ids=[stop], chunk=3)
    got, reasons = serve(engine, requests)
    for request, tokens, reason in zip(requests, got, reasons, strict=True):
        assert tokens == solo(config, params, request, [stop]), request
        assert reason == ("stop" if tokens[-1] == stop else "length") and (reason == "stop") == (len(tokens) <
                                                                                              request.max_new_tokens)
    assert got[0][-1] == stop and len(got[0]) == 7
    assert engine.runs["prefill", (1, 8)] >= 4  # the 30-token prompt took 4 chunks at least
    assert all_free(engine)


def test_a_prompt_over_several_rows_of_one_call_equals_it_alone(gqa):
    """Prompts of 45 and 40 tokens, 32-token rows: each takes two rows of the first call (its later row attends
    over its earlier one's keys, written in the same call); sampled and greedy, equal to each alone."""
    config, params, ref = gqa
    pool = requests_of(ref)[5].prompt + requests_of(ref)[3].prompt
    requests = [Request(pool[:45], 10, SamplingParams(temperature=0.8, top_p=0.9), 3), Request(pool[2:42], 9),
                Request(pool[7:16], 6)]
    engine = PagedEngine(params, config, slots=4, max_len=MAX_LEN, block_size=4, max_batch_tokens=128, chunk=3)
    got, _ = serve(engine, requests, add_every=1)
    assert got == [solo(config, params, r) for r in requests]
    assert engine.runs["prefill", (4, 32)] >= 1 and all_free(engine)


def test_the_prefix_cache_serves_a_shared_prefix_and_never_overwrites_it(gqa):
    """A conversation's second turn (its first turn's tokens and reply, then more) and two requests sharing a
    prompt start from cached blocks, equal to each alone; the shared blocks' contents do not change."""
    config, params, ref = gqa
    first, other, _, later = requests_of(ref)[:4]
    engine = PagedEngine(params, config, slots=3, max_len=MAX_LEN, block_size=4, chunk=3)
    (reply,), _ = serve(engine, [Request(first.prompt, 12)])
    turn = Request(list(first.prompt) + reply + list(later.prompt), 8)
    outputs = []
    sid = engine.add(turn)
    while not outputs or not outputs[-1].finish_reason:
        outputs += [o for o in engine.step() if o.sid == sid]
    assert outputs[0].cached == (len(first.prompt) + len(reply) - 1) // 4 * 4 > 0
    assert [t.id for o in outputs for t in o.tokens] == solo(config, params, turn)
    shared = Request(list(other.prompt) * 3, 10)  # 33 tokens: 8 full blocks
    serve(engine, [shared])
    blocks = engine.blocks.match(engine_keys(engine, shared))
    before = np.asarray(engine.pool.k[:, np.array(blocks)])
    twins = [Request(list(other.prompt) * 3 + [5, 6], 10, SamplingParams(temperature=1.0), 1),
             Request(list(other.prompt) * 3 + [7], 10)]
    got, _ = serve(engine, twins, add_every=1)
    assert got == [solo(config, params, r) for r in twins]
    np.testing.assert_array_equal(np.asarray(engine.pool.k[:, np.array(blocks)]), before)
    assert engine.counters["cached_tokens"] >= 32 * 2 and all_free(engine)


def run_all(engine, requests, steps=60):
    """Every request added at once, stepped until all finish (a test failure, not a hang, if some never does)."""
    sids = [engine.add(r) for r in requests]
    got, outputs = {sid: [] for sid in sids}, {sid: [] for sid in sids}
    for _ in range(steps):
        for out in engine.step():
            got[out.sid] += [t.id for t in out.tokens]
            outputs[out.sid].append(out)
        if not engine.running and not engine.waiting:
            return [got[sid] for sid in sids], [outputs[sid] for sid in sids]
    raise AssertionError(f"requests unfinished after {steps} steps")


def test_a_prompt_that_goes_on_with_part_of_a_cached_block_copies_it_and_leaves_it_as_it_was(gqa):
    """Past its shared full blocks, a prompt takes the tokens it shares with a cached block's (a conversation sent
    again with its reply, 2 tokens into a block of 4) into a copy of its own: two such requests at once, each going
    on differently, and a prompt sent again whole (its first token then sampled by a decode step: no prefill runs),
    each equal to itself alone; the cached block is never written."""
    config, params, ref = gqa
    first = requests_of(ref)[1]  # 11 tokens, and 4 more: 14 computed (3 blocks of 4, then 2 tokens into the 4th)
    stop = solo(config, params, Request(first.prompt, 4))[3]  # the reply ends with it
    engine = PagedEngine(params, config, slots=3, max_len=MAX_LEN, block_size=4, chunk=3, stop_ids=[stop])
    (reply,), _ = run_all(engine, [Request(first.prompt, 4)])
    assert reply[-1] == stop and len(reply) == 4
    history = list(first.prompt) + reply
    source, shared = engine.blocks.extend(engine_keys(engine, Request(history + [0], 1))[-1], history[12:])
    assert shared == 2 and source is not None
    before = np.asarray(engine.pool.k[:, source, :, :2])
    turns = [Request(history + [9, 4, 1], 8, SamplingParams(temperature=1.0), 5), Request(history + [2, 7], 6)]
    got, outputs = run_all(engine, turns)
    assert got == [solo(config, params, r, [stop]) for r in turns]
    assert [o[0].cached for o in outputs] == [len(history) - 1] * 2  # 14: 12 in shared blocks, 2 copied
    prefills = sum(n for (kind, _), n in engine.runs.items() if kind == "prefill")
    again = [Request(list(first.prompt), 6, SamplingParams(temperature=0.9), 2), Request(history, 5)]  # 10 and 14
    got, outputs = run_all(engine, again)  # the second ends with a stop id: its first token is still sampled
    assert got == [solo(config, params, r, [stop]) for r in again]
    assert [o[0].cached for o in outputs] == [len(first.prompt) - 1, len(history) - 1]
    assert sum(n for (kind, _), n in engine.runs.items() if kind == "prefill") == prefills
    np.testing.assert_array_equal(np.asarray(engine.pool.k[:, source, :, :2]), before)
    assert all_free(engine)


def engine_keys(engine, request):
    from llama_jax.generation.blocks import block_keys
    return block_keys(list(request.prompt)[:-1], engine.block_size)


def test_a_full_pool_preempts_the_youngest_and_it_continues_exactly(gqa):
    """A pool of 48 tokens for three requests that grow to 30-40 tokens each: requests wait for blocks, the
    youngest is preempted when a running one cannot grow, and every request still equals itself alone."""
    config, params, ref = gqa
    requests = [Request(r.prompt, 25, r.sampling, r.seed) for r in requests_of(ref)[:3]]
    engine = PagedEngine(params, config, slots=3, max_len=48, kv_tokens=48, block_size=4, chunk=2)
    got, _ = serve(engine, requests, add_every=1)
    assert got == [solo(config, params, r) for r in requests]
    assert engine.counters["preemptions"] > 0 and all_free(engine)


def test_a_prompt_done_decodes_in_the_same_step_and_a_request_done_at_its_first_token_does_not(gqa):
    """A step that completes a prompt goes on to decode it (its row does not idle for a call); one that stops or
    reaches max_new_tokens with the token its prefill samples gets nothing more."""
    config, params, ref = gqa
    prompts = [r.prompt for r in requests_of(ref)[:3]]
    first = solo(config, params, Request(prompts[2], 1))[0]
    requests = [Request(prompts[0], 10), Request(prompts[1], 1), Request(prompts[2], 10, stop_ids=(first,))]
    engine = PagedEngine(params, config, slots=4, max_len=MAX_LEN, block_size=4, chunk=3)  # 4: one prefill call
    sids = [engine.add(r) for r in requests]
    outputs = {out.sid: out for out in engine.step()}
    assert [t.id for t in outputs[sids[0]].tokens] == solo(config, params, requests[0])[:4]  # 1 sampled + 3 decoded
    assert outputs[sids[0]].finish_reason is None
    assert [(len(outputs[s].tokens), outputs[s].finish_reason) for s in sids[1:]] == [(1, "length"), (1, "stop")]
    assert engine.runs["decode", 1] == 1 and list(engine.running) == [sids[0]]


def test_a_request_preempted_right_after_its_prefill_keeps_its_token_and_continues_exactly(gqa):
    """Four blocks of 4 tokens: two prompts (3 and 6 tokens) fill three, then the older one's growth takes the last
    and the younger one's is preempted in the step its first token was sampled: that token is still delivered,
    and both equal themselves alone."""
    config, params, ref = gqa
    prompts = [r.prompt for r in requests_of(ref)[:2]]
    requests = [Request(prompts[0][:3], 10), Request((prompts[1] * 2)[:6], 8)]
    engine = PagedEngine(params, config, slots=4, max_len=16, kv_tokens=16, block_size=4, chunk=4)
    sids = [engine.add(r) for r in requests]
    outputs = {out.sid: out for out in engine.step()}
    assert engine.counters["preemptions"] == 1 and [s.sid for s in engine.waiting] == [sids[1]]
    assert len(outputs[sids[1]].tokens) == 1 and outputs[sids[1]].finish_reason is None
    got, reasons = {sid: [t.id for t in out.tokens] for sid, out in outputs.items()}, {}
    while engine.running or engine.waiting:
        for out in engine.step():
            got[out.sid] += [t.id for t in out.tokens]
            reasons[out.sid] = out.finish_reason
    assert [got[sid] for sid in sids] == [solo(config, params, r) for r in requests]
    assert [reasons[sid] for sid in sids] == ["length", "length"] and all_free(engine)


def test_a_lone_request_runs_one_row_whatever_the_slots(gqa):
    from llama_jax.generation.paged_steps import choose_shape, prefill_shapes

    assert prefill_shapes(512, 16, 4096) == [(1, 32), (1, 128), (1, 512), (4, 32), (4, 128), (16, 32)]
    assert prefill_shapes(8, 3, 64) == [(1, 8)] and prefill_shapes(512, 2, 64) == [(1, 32), (1, 64)]
    shapes = prefill_shapes(512, 16, 4096)  # the cheapest per token: a long prompt, four tails, eight short ones
    assert [choose_shape(shapes, p)[0] for p in ([1437], [30] * 4, [100] * 8, [5])] == [(1, 512), (4, 32), (4, 128),
                                                                                         (1, 32)]
    # prompts longer than a row take several: 104 of 130 tokens in 128 computed, rather than 84
    assert choose_shape(shapes, [40, 70, 20]) == ((4, 32), [(0, 32), (0, 8), (1, 32), (1, 32)])
    # ... but fewer, wider rows when one prompt has a long context already (every row would read all of it)
    assert [choose_shape(shapes, [200, 200, 100], c)[0] for c in ([0] * 3, [3000, 0, 0])] == [(16, 32), (4, 128)]
    config, params, ref = gqa
    request = requests_of(ref)[0]
    engine = PagedEngine(params, config, slots=16, max_len=MAX_LEN, chunk=4, top_logprobs=3)
    got, _ = serve(engine, [request])
    assert got[0] == solo(config, params, request)
    assert {shape for kind, shape in engine.runs if kind == "decode"} == {1}
    assert {shape for kind, shape in engine.runs if kind == "prefill"} == {(1, 32)}  # 5 tokens: the narrowest


def test_logprobs_are_the_models_and_the_chosen_token_is_among_the_top(gqa):
    config, params, ref = gqa
    request = requests_of(ref)[0]
    engine = PagedEngine(params, config, slots=2, max_len=MAX_LEN, chunk=4, top_logprobs=3)
    engine.add(request)
    emitted = [t for _ in range(4) for out in engine.step() for t in out.tokens]
    assert [t.id for t in emitted] == solo(config, params, request)[:len(emitted)]
    for token in emitted:  # greedy: the chosen token is the most likely one, with its log-probability
        assert len(token.top) == 3 and token.top[0] == (token.id, pytest.approx(token.logprob))
        assert token.logprob <= 0 and token.top[0][1] >= token.top[1][1] >= token.top[2][1]


def test_requests_and_sizes_that_cannot_work_are_refused(gqa):
    config, params, _ = gqa
    engine = PagedEngine(params, config, slots=1, max_len=MAX_LEN)
    with pytest.raises(ValueError, match="does not fit the context of 64"):
        engine.add(Request([1] * 60, 6))
    with pytest.raises(ValueError, match=r"\[0, 256\)"):
        engine.add(Request([1, 256], 2))
    with pytest.raises(ValueError, match="at least one token"):
        engine.add(Request([], 2))
    sizes = dict(slots=1, max_len=64, kv_tokens=64, block_size=16, max_batch_tokens=512, chunk=4)
    for change, message in [({"kv_tokens": 63}, "kv_tokens 63 is below max_len 64"),
                            ({"block_size": 24}, "block_size 24 must divide max_len 64"),
                            ({"max_batch_tokens": 0}, "max_batch_tokens must be >= 1")]:
        with pytest.raises(ValueError, match=message):
            check_sizes(**sizes | change)
    assert all_free(engine)


def test_the_scheduler_serves_every_request_frees_cancelled_ones_and_refuses_when_full(gqa):
    config, params, ref = gqa
    requests = requests_of(ref)
    engine = PagedEngine(params, config, slots=2, max_len=MAX_LEN, chunk=2)
    scheduler = Scheduler(engine, max_waiting=len(requests))
    got = {i: [] for i in range(len(requests) + 1)}
    ended = {i: threading.Event() for i in got}

    def emit_to(i):
        def emit(update):
            got[i].extend(t.id for t in update.tokens)
            if update.finish_reason:
                got[i].append(update.finish_reason)
                ended[i].set()
        return emit

    endless = scheduler.submit(Request(requests[0].prompt, 40), emit_to(len(requests)))  # cancelled below
    tickets = [scheduler.submit(r, emit_to(i)) for i, r in enumerate(requests[:-1])]
    with pytest.raises(QueueFull):
        scheduler.submit(requests[-1], emit_to(len(requests) - 1))
    with pytest.raises(ValueError, match="does not fit"):
        scheduler.submit(Request([1] * 60, 6), emit_to(0))
    tickets[-1].cancel()  # a waiting request whose client left frees its place at once
    tickets[-1] = scheduler.submit(requests[-2], emit_to(len(requests) - 2))
    scheduler.start()
    while len(got[len(requests)]) < 3:
        threading.Event().wait(0.01)
    endless.cancel()
    tickets.append(scheduler.submit(requests[-1], emit_to(len(requests) - 1)))
    for i in range(len(requests)):
        assert ended[i].wait(120), i
    scheduler.close(timeout=60)
    for i, request in enumerate(requests):
        assert got[i][:-1] == solo(config, params, request) and got[i][-1] == "length"
    assert not ended[len(requests)].is_set() and len(got[len(requests)]) < 40  # the cancelled one stopped early
    load = scheduler.load()
    assert (load["busy"], load["waiting"], load["blocks_used"]) == (0, 0, 0) and all_free(engine)


@pytest.mark.slow  # 8 simulated devices; test_quantize and test_generate cover a mesh fast
@pytest.mark.parametrize("spec", ["data=2,tensor=4"])
def test_a_sharded_engine_equals_one_device(gqa, spec):
    import llama_jax as lj

    config, params, ref = gqa
    requests = requests_of(ref)[:4]
    options = dict(slots=4, max_len=MAX_LEN, block_size=4, chunk=3, max_batch_tokens=16)  # one prefill shape
    single = PagedEngine(params, config, **options)
    sharded = PagedEngine(params, config, **options, mesh=lj.make_mesh(spec))
    assert len(sharded.pool.k.sharding.device_set) == 8
    assert serve(sharded, requests) == serve(single, requests)

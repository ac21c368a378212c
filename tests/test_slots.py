"""The slot engine: requests joining a running batch, each with its own settings, equal the batch Engine on that
request alone; freed slots are reused; a step attends over only the slots its rows fill."""

import numpy as np
import pytest
from conftest import load_fixture

from llama_jax.generation import Engine, Request, SamplingParams, SlotEngine, kv_lengths, prefill_lengths

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


def solo(config, params, request, stop_ids):
    """The request through the batch Engine (of the gqa fixture), alone."""
    if request.sampling not in ENGINES:
        ENGINES[request.sampling] = Engine(params, config, max_len=MAX_LEN, sampling=request.sampling)
    engine = ENGINES[request.sampling]
    result = engine.generate([request.prompt], max_new_tokens=request.max_new_tokens, stop_ids=stop_ids,
                             seed=request.seed)
    return result.completions[0].tokens


def serve(engine, requests, admit_every=2):
    """Admit a waiting request into a free slot every `admit_every` steps (so requests join running batches),
    release finished rows at once; returns each request's tokens and finish reason, and the slots each one ran in."""
    waiting, tokens, placed, owner, reasons, steps = list(range(len(requests))), {}, {}, {}, {}, 0
    while waiting or owner:
        free = engine.free_slots()
        if waiting and free and steps % admit_every == 0:
            i = waiting.pop(0)
            owner[free[0]], placed[i] = i, free[0]
            tokens[i] = [engine.admit(free[0], requests[i]).id]
        else:
            for slot, new in enumerate(engine.step()):
                if slot in owner:
                    tokens[owner[slot]].extend(t.id for t in new)
            steps += 1
        for slot, reason in engine.finish_reasons().items():
            engine.release(slot)
            reasons[owner.pop(slot)] = reason
    return [tokens[i] for i in range(len(requests))], [reasons[i] for i in range(len(requests))], placed


def test_requests_joining_a_running_batch_equal_each_alone(gqa):
    config, params, ref = gqa
    requests = requests_of(ref)
    stop = solo(config, params, requests[0], ())[6]  # request 0 (greedy) stops early at its 7th token
    engine = SlotEngine(params, config, slots=3, max_len=MAX_LEN, stop_ids=[stop], chunk=3)
    got, reasons, placed = serve(engine, requests)
    for request, tokens, reason in zip(requests, got, reasons, strict=True):
        assert tokens == solo(config, params, request, [stop]), request
        assert reason == ("stop" if tokens[-1] == stop else "length") and (reason == "stop") == (len(tokens) <
                                                                                              request.max_new_tokens)
    assert got[0][-1] == stop and len(got[0]) == 7
    assert sorted(placed.values()).count(0) >= 2  # freed slots were reused
    assert not engine.busy.any() and engine.free_slots() == [0, 1, 2]


def test_logprobs_are_the_models_and_the_chosen_token_is_among_the_top(gqa):
    config, params, ref = gqa
    request = requests_of(ref)[0]
    engine = SlotEngine(params, config, slots=2, max_len=MAX_LEN, chunk=4, top_logprobs=3)
    first = engine.admit(1, request)
    emitted = [first] + [t for _ in range(3) for t in engine.step()[1]]
    assert [t.id for t in emitted] == solo(config, params, request, ())[:len(emitted)]
    for token in emitted:  # greedy: the chosen token is the most likely one, with its log-probability
        assert len(token.top) == 3 and token.top[0] == (token.id, pytest.approx(token.logprob))
        assert token.logprob <= 0 and token.top[0][1] >= token.top[1][1] >= token.top[2][1]


def test_a_step_attends_over_the_busy_rows_tokens_only(gqa):
    config, params, ref = gqa
    assert kv_lengths(64) == [64] and kv_lengths(300) == [64, 128, 256, 300]
    assert prefill_lengths(64) == [16, 32, 64] and prefill_lengths(100) == [16, 32, 64, 100]
    engine = SlotEngine(params, config, slots=2, max_len=256, chunk=4)
    assert engine.kv_len() == 64
    engine.admit(0, Request(list(range(1, 70)), 10))
    assert engine.kv_len() == 128  # 69 tokens + a chunk of 4
    engine.release(0)
    assert engine.kv_len() == 64


def test_requests_that_do_not_fit_are_refused(gqa):
    config, params, _ = gqa
    engine = SlotEngine(params, config, slots=1, max_len=MAX_LEN)
    with pytest.raises(ValueError, match="does not fit the context of 64"):
        engine.admit(0, Request([1] * 60, 6))
    with pytest.raises(ValueError, match=r"\[0, 256\)"):
        engine.admit(0, Request([1, 256], 2))
    with pytest.raises(ValueError, match="at least one token"):
        engine.admit(0, Request([], 2))
    assert engine.free_slots() == [0]


def test_the_scheduler_serves_every_request_frees_cancelled_ones_and_refuses_when_full(gqa):
    import threading

    from llama_jax.generation import QueueFull, Scheduler

    config, params, ref = gqa
    requests = requests_of(ref)
    engine = SlotEngine(params, config, slots=2, max_len=MAX_LEN, chunk=2)
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
    scheduler.start()
    while len(got[len(requests)]) < 3:
        threading.Event().wait(0.01)
    endless.cancel()
    tickets.append(scheduler.submit(requests[-1], emit_to(len(requests) - 1)))
    for i in range(len(requests)):
        assert ended[i].wait(120), i
    scheduler.close(timeout=60)
    for i, request in enumerate(requests):
        assert got[i][:-1] == solo(config, params, request, ()) and got[i][-1] == "length"
    assert not ended[len(requests)].is_set() and len(got[len(requests)]) < 40  # the cancelled one stopped early
    assert scheduler.load() == {"slots": 2, "busy": 0, "waiting": 0} and engine.free_slots() == [0, 1]


def test_resuming_a_row_equals_generating_from_the_whole_conversation(gqa):
    """A conversation's second turn prefilled after the first turn's cached tokens (while another row decodes and
    the freed row idles through its steps) equals generating from the whole token sequence at once."""
    config, params, ref = gqa
    first, other, _, later = requests_of(ref)[:4]
    engine = SlotEngine(params, config, slots=2, max_len=MAX_LEN, chunk=3)
    reply = [engine.admit(0, Request(first.prompt, 5)).id]
    engine.admit(1, Request(other.prompt, 20))
    while 0 not in engine.finish_reasons():
        reply += [t.id for t in engine.step()[0]]
    engine.release(0)
    engine.step()  # row 0 is free: its slots advance as padding
    turn = [reply[-1]] + list(later.prompt)  # the last token was never fed back: it starts the next turn
    second = [engine.resume(0, Request(turn, 8), position=len(first.prompt) + len(reply) - 1).id]
    while 0 not in engine.finish_reasons():
        second += [t.id for t in engine.step()[0]]
    assert second == solo(config, params, Request(list(first.prompt) + reply + list(later.prompt), 8), ())


@pytest.mark.parametrize("spec", ["data=2,tensor=4"])
def test_a_sharded_slot_engine_equals_one_device(gqa, spec):
    import llama_jax as lj

    config, params, ref = gqa
    requests = requests_of(ref)[:4]
    single = SlotEngine(params, config, slots=4, max_len=MAX_LEN, chunk=3)
    sharded = SlotEngine(params, config, slots=4, max_len=MAX_LEN, chunk=3, mesh=lj.make_mesh(spec))
    assert len(sharded.cache.k.sharding.device_set) == 8
    assert serve(sharded, requests)[:2] == serve(single, requests)[:2]

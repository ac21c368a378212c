"""The serve suite: `python -m infer.serve` against llama.cpp's C++ `llama-server` (bench/llama_server.py builds it)
on the same SmolLM2-135M-Instruct weights (our float32 checkpoint, its F32 GGUF), streamed through the official
`openai` client, greedy, one server at a time (each gets every core).

  lone      one request at a time: inter-token latency (the median over four prompts) against the batch `Engine`
            at batch 1 on the same prompts, in this process (ours on --slots 8 and on --slots 1)
  load      the same 32 requests (prompts of 12-160 words, --new-tokens each) from 8 and from 32 clients: output
            tokens/s, time to first token p50/p95
  prefix    32 requests sharing one ~1,500-token system prompt, each with its own question, 4 clients: TTFT p50
            (ours, ours with --no-prefix-cache, llama-server with cache_prompt)
  long      a ~3,000-token prompt alone (TTFT), and arriving while 4 streams decode: the longest gap between those
            streams' tokens while it is prefilled, against its TTFT
  capacity  ours with --slots 64 --kv-tokens 16384 --max-len 1024: 64 requests of ~200 tokens at once: TTFT p95
            against the mean request's duration

Both servers run --parallel/--slots 8 with 8 x 4096 tokens of context unless said.
"""

from __future__ import annotations

import concurrent.futures
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np

from bench import fill
from bench.common import logger, md_table
from bench.cpu import smollm2
from bench.llama_cpp_peer import write_gguf
from bench.llama_server import llama_server
from llama_jax.checkpoints import smollm2_gguf_path

TEXT = Path("/usr/share/common-licenses/GPL-3")
SLOTS, MAX_LEN = 8, 4096
log = logger("serve")


def words(start: int, count: int) -> str:
    text = TEXT.read_text().split()
    return " ".join((text * 4)[start:start + count])


class Server:
    """A server process (argv[0] an executable) on `port`, ready once GET /v1/models answers; stopped on exit."""

    def __init__(self, argv: list[str], port: int):
        self.argv, self.url = argv, f"http://127.0.0.1:{port}/v1"

    def __enter__(self):
        self.log = tempfile.TemporaryFile("w+")  # not a pipe: a chatty server would block once it is full
        self.process = subprocess.Popen(self.argv, stdout=self.log, stderr=subprocess.STDOUT, text=True)
        start = time.perf_counter()
        while True:
            if self.process.poll() is not None:
                self.log.seek(0)
                raise RuntimeError(f"{' '.join(self.argv[:3])} exited: {self.log.read()[-2000:]}")
            try:
                urllib.request.urlopen(self.url + "/models", timeout=5)
                break
            except OSError:
                time.sleep(0.5)
        self.startup_s = time.perf_counter() - start
        return self

    def __exit__(self, *exc):
        self.process.terminate()
        self.process.wait(timeout=120)
        self.log.close()


def stream(url: str, prompt: str, max_tokens: int) -> dict:
    """A streamed greedy completion: when it was sent, and when each token came."""
    import openai

    client = openai.OpenAI(base_url=url, api_key="bench", max_retries=0, timeout=900)
    sent, times, usage = time.perf_counter(), [], None
    for chunk in client.completions.create(model="smol", prompt=prompt, max_tokens=max_tokens, temperature=0,
                                           stream=True, stream_options={"include_usage": True},
                                           extra_body={"cache_prompt": True}):
        if chunk.usage is not None:
            usage = chunk.usage.completion_tokens
        if chunk.choices:  # a token came (its text may be empty: held back, or a special token)
            times.append(time.perf_counter())
    tokens = usage or len(times)  # a server without usage in streams sends one token per chunk
    return {"sent": sent, "times": times, "ttft": times[0] - sent, "tokens": tokens,
            "itl": (times[-1] - times[0]) / max(tokens - 1, 1), "duration": times[-1] - sent}


def many(url: str, prompts: list[str], max_tokens: int, clients: int) -> tuple[list[dict], float]:
    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(lambda p: stream(url, p, max_tokens), prompts))
    return results, time.perf_counter() - start


def pct(results: list[dict], key: str, q: float) -> float:
    return float(np.percentile([r[key] for r in results], q))


def load_prompts() -> list[str]:
    return [words(37 * i, 12 + (i * 29) % 149) for i in range(32)]


def prefix_prompts() -> list[str]:
    system = "Answer from this licence:\n" + words(0, 1150) + "\n\n"
    return [system + f"Question {i}: what does section {i % 17} say about {words(3000 + 11 * i, 3)}?\nAnswer:"
            for i in range(32)]


def scenarios(name: str, url: str, new_tokens: int) -> dict:
    """Every scenario but capacity on one server."""
    out = {}
    stream(url, "Warm up.", 4)
    out["lone_itl_s"] = float(np.median([stream(url, p, new_tokens)["itl"] for p in load_prompts()[:4]]))
    for clients in (8, 32):
        results, wall = many(url, load_prompts(), new_tokens, clients)
        out[f"load{clients}"] = {"tok_s": sum(r["tokens"] for r in results) / wall,
                                 "ttft_p50": pct(results, "ttft", 50), "ttft_p95": pct(results, "ttft", 95)}
    prompts = prefix_prompts()
    stream(url, prompts[0], 2)  # the shared prompt computed once (what a cache would keep)
    results, _ = many(url, prompts[1:], 8, 4)
    out["prefix_ttft_p50"] = pct(results, "ttft", 50)
    long_prompt = words(5000, 2300)
    out["long_alone_ttft"] = stream(url, long_prompt, 2)["ttft"]
    stream(url, "Warm up again.", 2)
    out |= long_beside_streams(url, words(9000, 2300), new_tokens)
    log(f"{name}: {out}")
    return out


def long_beside_streams(url: str, long_prompt: str, new_tokens: int) -> dict:
    """4 streams decoding when a long prompt arrives: their longest gap while it is prefilled, and its TTFT."""
    with concurrent.futures.ThreadPoolExecutor(5) as pool:
        streams = [pool.submit(stream, url, p, 4 * new_tokens) for p in load_prompts()[:4]]
        time.sleep(2.0)
        long = pool.submit(stream, url, long_prompt, 2).result()
        results = [s.result() for s in streams]
    window = (long["sent"], long["sent"] + long["ttft"])
    gaps = [b - a for r in results for a, b in zip(r["times"], r["times"][1:], strict=False)
            if b > window[0] and a < window[1]]
    return {"long_beside_ttft": long["ttft"], "longest_gap": max(gaps, default=0.0)}


def capacity(url: str) -> dict:
    prompts = [words(23 * i, 75) for i in range(64)]  # ~100 tokens each, and 100 new
    results, _ = many(url, prompts, 100, 64)
    return {"ttft_p95": pct(results, "ttft", 95), "mean_duration": float(np.mean([r["duration"] for r in results]))}


def engine_itl(checkpoint: Path, new_tokens: int) -> float:
    """The batch Engine at batch 1 on the lone requests' prompts, the statistic the servers get (the median of the
    prompts' seconds per token after the first)."""
    from llama_jax.checkpoints import load_params, open_checkpoint
    from llama_jax.generation import Engine
    from llama_jax.text import encoder_for

    ck = open_checkpoint(checkpoint)
    engine = Engine(load_params(ck, per_layer=True), ck.config, max_len=1024)
    prompts = [encoder_for(ck).tokenizer.encode(p).ids for p in load_prompts()[:4]]
    engine.generate(prompts[:1], max_new_tokens=new_tokens)  # warm (decode_s leaves compilation out anyway)
    return float(np.median([engine.generate([ids], max_new_tokens=new_tokens).decode_s / (new_tokens - 1)
                            for ids in prompts]))


def run(args) -> dict:
    dirs, _ = smollm2(args.cache_dir)
    gguf = write_gguf(smollm2_gguf_path(), args.cache_dir / "smollm2-135m-instruct-F32.gguf", "F32")
    binary = llama_server(args.cache_dir)
    ours = [sys.executable, "-m", "infer.serve", str(dirs["float32"]), "--name", "smol", "--max-len", str(MAX_LEN)]
    servers = {
        "ours": ours + ["--port", "8931", "--slots", str(SLOTS)],
        "ours --no-prefix-cache": ours + ["--port", "8933", "--slots", str(SLOTS), "--no-prefix-cache"],
        "llama-server": [str(binary), "-m", str(gguf), "--port", "8932", "--parallel", str(SLOTS), "-c",
                         str(SLOTS * MAX_LEN), "--alias", "smol", "--log-disable"],
    }
    results = {"engine_itl_s": engine_itl(dirs["float32"], args.new_tokens), "startup_s": {},
               "new_tokens": args.new_tokens}
    for name, argv in servers.items():
        log(f"{name}: starting")
        with Server(argv, int(argv[argv.index("--port") + 1])) as server:
            results["startup_s"][name] = server.startup_s
            if name == "ours --no-prefix-cache":
                stream(server.url, "Warm up.", 4)
                prompts = prefix_prompts()
                stream(server.url, prompts[0], 2)
                results[name] = {"prefix_ttft_p50": pct(many(server.url, prompts[1:], 8, 4)[0], "ttft", 50)}
            else:
                results[name] = scenarios(name, server.url, args.new_tokens)
    with Server(ours + ["--port", "8934", "--slots", "1"], 8934) as server:
        stream(server.url, "Warm up.", 4)
        results["ours --slots 1"] = {"lone_itl_s": float(np.median(
            [stream(server.url, p, args.new_tokens)["itl"] for p in load_prompts()[:4]]))}
    with Server(ours[:-2] + ["--port", "8935", "--slots", "64", "--kv-tokens", "16384", "--max-len", "1024"],
                8935) as server:
        stream(server.url, "Warm up.", 4)
        results["capacity"] = capacity(server.url)
    fill_args = type("Args", (), dict(preset="smollm2-135m", slots=8, max_len=2048, dtype="float32", chunk=4,
                                      rounds=3))
    results["fill"] = fill.measure(fill_args)
    return results


def markdown(results: dict, new_tokens: int) -> str:
    ours, peer = results["ours"], results["llama-server"]
    engine = results["engine_itl_s"]
    rows = [["lone request ITL ms (/ batch Engine at batch 1)", f"{ours['lone_itl_s'] * 1e3:.1f} "
             f"({ours['lone_itl_s'] / engine:.2f}x); --slots 1: {results['ours --slots 1']['lone_itl_s'] * 1e3:.1f} "
             f"({results['ours --slots 1']['lone_itl_s'] / engine:.2f}x)", f"{peer['lone_itl_s'] * 1e3:.1f}",
             f"{ours['lone_itl_s'] / peer['lone_itl_s']:.2f}x"]]
    for clients in (8, 32):
        a, b = ours[f"load{clients}"], peer[f"load{clients}"]
        rows.append([f"{clients} clients: output tok/s", f"{a['tok_s']:.1f}", f"{b['tok_s']:.1f}",
                     f"{a['tok_s'] / b['tok_s']:.2f}x"])
        rows.append([f"{clients} clients: TTFT p50 / p95 s", f"{a['ttft_p50']:.2f} / {a['ttft_p95']:.2f}",
                     f"{b['ttft_p50']:.2f} / {b['ttft_p95']:.2f}", f"{a['ttft_p50'] / b['ttft_p50']:.2f}x (p50)"])
    off = results["ours --no-prefix-cache"]["prefix_ttft_p50"]
    rows.append(["shared 1,500-token prefix: TTFT p50 s", f"{ours['prefix_ttft_p50']:.3f} ({off:.3f} without the "
                 f"prefix cache: {off / ours['prefix_ttft_p50']:.1f}x)", f"{peer['prefix_ttft_p50']:.3f}",
                 f"{ours['prefix_ttft_p50'] / peer['prefix_ttft_p50']:.2f}x"])
    rows.append(["3,000-token prompt alone: TTFT s", f"{ours['long_alone_ttft']:.2f}", f"{peer['long_alone_ttft']:.2f}",
                 f"{ours['long_alone_ttft'] / peer['long_alone_ttft']:.2f}x"])
    rows.append(["... beside 4 streams: longest stream gap / its TTFT",
                 f"{ours['longest_gap']:.2f} s / {ours['long_beside_ttft']:.2f} s "
                 f"({ours['longest_gap'] / ours['long_beside_ttft']:.2f})",
                 f"{peer['longest_gap']:.2f} s / {peer['long_beside_ttft']:.2f} s "
                 f"({peer['longest_gap'] / peer['long_beside_ttft']:.2f})", "-"])
    cap = results["capacity"]
    rows.append(["capacity: 64 requests at once, --slots 64 --kv-tokens 16384: TTFT p95 / mean duration s",
                 f"{cap['ttft_p95']:.2f} / {cap['mean_duration']:.2f}", "-", "-"])
    starts = ", ".join(f"{name} {s:.0f} s" for name, s in results["startup_s"].items())
    fill_table = md_table(["fill", "requests running of slots", "decode step ms", "/ the first row's time"],
                          results["fill"])
    return (f"SmolLM2-135M-Instruct float32 (ours) and F32 GGUF (llama-server), --slots/--parallel {SLOTS}, "
            f"{new_tokens} new tokens per request unless said, greedy, streamed through the openai client; ready "
            f"after: {starts} (ours compiles every shape first)\n\n"
            f"{md_table(['measure', 'ours', 'llama-server', 'ours / llama-server'], rows)}\n\n"
            f"Paged engine decode step against fill and requests running (smollm2-135m shape, 8 slots x 2048, "
            f"float32):\n\n{fill_table}\n")


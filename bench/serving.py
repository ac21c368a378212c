"""The serve suite: `python -m infer.serve` against llama-cpp-python's OpenAI server on the same weights, through the
official `openai` client, in one run.

  ours       python -m infer.serve on the SmolLM2-135M-Instruct float32 checkpoint, --slots 8
  llama.cpp  python -m llama_cpp.server on the F32 GGUF of the same weights (`pip install -e .[bench]`); it runs
             one request at a time, the others queued (--interrupt_requests False: by default a new request cuts
             the running one short)

The same requests (prompts cut from the GPL-3 text, 12 to 160 words; greedy; --new-tokens each) are sent by 1, 8
and 32 concurrent clients, streaming, to one server at a time (the other is stopped: both get every core). Per
level: output tokens/s over the whole run, and p50/p95 of the time to first token and of the inter-token latency
(per request: time from its first to its last token over its tokens after the first). Then the slot engine's
decode step at 10% and 100% of its cache's fill (bench/fill.py, SmolLM2's shape).
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
from llama_jax.checkpoints import smollm2_gguf_path

CONCURRENCY = (1, 8, 32)
MAX_LEN = 512
TEXT = Path("/usr/share/common-licenses/GPL-3")
log = logger("serve")


def prompts(count: int) -> list[str]:
    words = TEXT.read_text().split()
    return [" ".join(words[37 * i:37 * i + 12 + (i * 29) % 149]) for i in range(count)]


class Server:
    """A server process on `port`, ready once GET /v1/models answers; stopped on exit."""

    def __init__(self, argv: list[str], port: int):
        self.argv, self.url = argv, f"http://127.0.0.1:{port}/v1"

    def __enter__(self):
        self.log = tempfile.TemporaryFile("w+")  # not a pipe: a chatty server would block once it is full
        self.process = subprocess.Popen([sys.executable, *self.argv], stdout=self.log, stderr=subprocess.STDOUT,
                                        text=True)
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


def one(client, model: str, prompt: str, max_tokens: int) -> dict:
    """A streamed completion: when its first and last tokens came, and how many."""
    start = time.perf_counter()
    first = last = None
    chunks, usage = 0, None
    for chunk in client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens, temperature=0,
                                           stream=True, stream_options={"include_usage": True}):
        if chunk.usage is not None:
            usage = chunk.usage.completion_tokens
        if chunk.choices and chunk.choices[0].text:
            last = time.perf_counter()
            first = first or last
            chunks += 1
    tokens = usage or chunks  # a server without usage in streams sends one token per chunk
    return {"ttft": first - start, "itl": (last - first) / max(tokens - 1, 1), "tokens": tokens}


def load(url: str, model: str, requests: list[str], max_tokens: int, concurrency: int) -> dict:
    import openai

    client = openai.OpenAI(base_url=url, api_key="bench", max_retries=0, timeout=600)
    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(lambda p: one(client, model, p, max_tokens), requests))
    wall = time.perf_counter() - start
    pct = lambda key, q: float(np.percentile([r[key] for r in results], q)) * 1e3  # noqa: E731
    return {"concurrency": concurrency, "tok_s": sum(r["tokens"] for r in results) / wall,
            "ttft_p50_ms": pct("ttft", 50), "ttft_p95_ms": pct("ttft", 95), "itl_p50_ms": pct("itl", 50),
            "itl_p95_ms": pct("itl", 95), "tokens": sum(r["tokens"] for r in results)}


def run(args) -> dict:
    dirs, config = smollm2(args.cache_dir)
    gguf = write_gguf(smollm2_gguf_path(), args.cache_dir / "smollm2-135m-instruct-F32.gguf", "F32")
    requests = prompts(16 if args.quick else 32)
    servers = {
        "ours": ["-m", "infer.serve", str(dirs["float32"]), "--port", "8931", "--slots", "8", "--max-len",
                 str(MAX_LEN), "--name", "smol"],
        "llama.cpp": ["-m", "llama_cpp.server", "--model", str(gguf), "--port", "8932", "--n_ctx", str(MAX_LEN),
                      "--model_alias", "smol", "--interrupt_requests", "False"],  # queue requests, don't cut them
    }
    rows, startup = [], {}
    for name, argv in servers.items():
        log(f"{name}: starting the server")
        with Server(argv, int(argv[argv.index("--port") + 1])) as server:
            startup[name] = server.startup_s
            load(server.url, "smol", requests[:2], 4, 2)  # warm (llama.cpp builds its graph on first use)
            for concurrency in CONCURRENCY:
                log(f"{name}: {len(requests)} requests, {concurrency} at a time")
                rows.append({"server": name, **load(server.url, "smol", requests, args.new_tokens, concurrency)})
    log("decode step against cache fill")
    fill_args = type("Args", (), dict(preset="smollm2-135m", slots=8, max_len=2048, dtype="float32", chunk=4,
                                      rounds=3))
    return {"serving": rows, "startup_s": startup, "requests": len(requests), "new_tokens": args.new_tokens,
            "fill": fill.measure(fill_args)}


def markdown(results: dict, new_tokens: int) -> str:
    rows = results["serving"]
    alone = {r["server"]: r["tok_s"] for r in rows if r["concurrency"] == 1}
    peer = {r["concurrency"]: r["tok_s"] for r in rows if r["server"] == "llama.cpp"}
    table = md_table(
        ["server", "clients", "output tok/s", "/ same server, 1 client", "/ llama.cpp, same clients",
         "TTFT p50 ms", "TTFT p95 ms", "ITL p50 ms", "ITL p95 ms"],
        [[r["server"], str(r["concurrency"]), f"{r['tok_s']:.1f}", f"{r['tok_s'] / alone[r['server']]:.2f}x",
          f"{r['tok_s'] / peer[r['concurrency']]:.2f}x", f"{r['ttft_p50_ms']:.0f}", f"{r['ttft_p95_ms']:.0f}",
          f"{r['itl_p50_ms']:.1f}", f"{r['itl_p95_ms']:.1f}"] for r in rows])
    starts = ", ".join(f"{name} {s:.0f} s" for name, s in results["startup_s"].items())
    fill_table = md_table(["fill", "kv_len read", "decode step ms", "/ the 10% step's time"], results["fill"])
    return (f"{results['requests']} requests of {new_tokens} new tokens each (greedy), streamed through the openai "
            f"client; servers ready after: {starts} (ours compiles every shape first)\n\n{table}\n\n"
            f"Slot engine decode step against cache fill (smollm2-135m shape, 8 slots x 2048, float32):\n\n"
            f"{fill_table}\n")

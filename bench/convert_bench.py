"""Time `python -m convert hf` and `python -m convert export` and measure their peak memory, against the disk.

    python bench/convert_bench.py --preset llama3.2-1b [--src HF_DIR] [--workdir DIR] [--record BENCHMARKS.md]

Steps, all in one run so the numbers share a machine state:

1. the source: `--src`, or a synthetic checkpoint of `--preset` made by bench/make_synthetic_hf.py in the workdir.
2. disk: write a `--disk-test-gb` file (fsync'd), read it back cold, copy it cold (read + write + fsync), read it
   warm (page cache), and one in-memory copy (memcpy bandwidth); again after step 3 (a VM disk varies from minute
   to minute: both are reported, the best is the ceiling). The converter reads and writes every byte once, so
   "cold copy" is the ceiling to compare its GB/s with.
3. `python -m convert hf SRC WORKDIR/ckpt --force`, then `python -m convert export WORKDIR/ckpt WORKDIR/hf --force`,
   each as a child process. Before each, the input files are fsync'd and evicted from the page cache with
   posix_fadvise(DONTNEED) (per file, no root or global drop_caches needed), so the child reads from the disk
   (a VM's host may still cache: that is outside our reach). Measured: wall time to exit, and wall time until its
   output is durable (the bench fsyncs every output file after the exit); CPU time and disk blocks from wait4's
   rusage; peak RSS = the child's VmHWM (its own high-water mark, read from /proc/PID/status every 10 ms until it
   exits), and the sampled peaks of RssAnon / RssFile (file-backed pages are the mmap'd safetensors the reader
   touches: the kernel can drop them under pressure; anonymous ones it cannot). Also the peak RSS of a child that
   only imports the converter (baseline).
4. check: the exported safetensors equal the source bit for bit (tensor by tensor, memory-mapped).

Prints a table and, with `--record`, inserts a dated entry in that markdown file's section "## Checkpoint
conversion" (created if missing; other sections are kept).
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import os
import platform
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

import llama_jax
from llama_jax.checkpoints import tensor_mappings
from llama_jax.errors import InputError, exit_code
from llama_jax.model import PRESETS

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: python bench/convert_bench.py
from bench.common import record  # noqa: E402

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
SECTION = "## Checkpoint conversion (bench/convert_bench.py)"
SECTION_INTRO = """\
`python -m convert hf` (HF safetensors -> llama_jax Orbax checkpoint) and `python -m convert export` (back), on a
synthetic checkpoint with the real shapes (bench/make_synthetic_hf.py), each run as a child process with its
input evicted from the page cache. GB/s = model bytes / wall seconds (to the child's exit; "durable" adds the
fsync of its output). Peak RSS is the child's VmHWM; RssAnon/RssFile are sampled peaks. "Cold copy" is a
read + write + fsync of a large file on the same filesystem (measured before and after the conversions; the
better one is used), the ceiling for a converter that reads and writes every byte once. Newest entry last.
"""
GB = 1e9
MIB = 1 << 20


# ----- the machine -----

def machine() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor() or "unknown")
    meminfo = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
    ram = int(meminfo["MemTotal"].split()[0]) * 1024
    return {"nproc": os.cpu_count(), "affinity": len(os.sched_getaffinity(0)), "cpu": cpu, "ram": ram,
            "kernel": platform.release(), "python": platform.python_version()}


def filesystem(path: Path) -> str:
    try:
        out = subprocess.run(["df", "-T", str(path)], capture_output=True, text=True, check=True).stdout
        fields = out.splitlines()[1].split()
        return f"{fields[1]} on {fields[0]} ({int(fields[4]) / 1e6:.0f} GB free)"
    except (OSError, subprocess.CalledProcessError, IndexError, ValueError):
        return "unknown"


def versions() -> dict:
    out = {}
    for name in ("llama_jax", "jax", "jaxlib", "orbax-checkpoint", "tensorstore", "safetensors", "numpy",
                 "ml_dtypes"):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "-"
    return out


# ----- page cache and fsync -----

def files_under(path: Path) -> list[Path]:
    return [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())


def fsync_tree(path: Path) -> None:
    """fsync every file and directory under `path` (and `path`'s parent, which holds its name)."""
    for p in files_under(path):
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    dirs = [path.parent] + ([path] + [p for p in path.rglob("*") if p.is_dir()] if path.is_dir() else [])
    for d in dirs:
        fd = os.open(d, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def evict(path: Path) -> None:
    """Write back and drop `path`'s pages from the page cache (this kernel's; a VM host may keep its own)."""
    for p in files_under(path):
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def tree_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in files_under(path))


# ----- disk bandwidth -----

def disk_bandwidth(directory: Path, size: int, block: int = 64 * MIB) -> dict:
    """GB/s of: fsync'd sequential write, cold read, cold copy (read+write+fsync), warm read, in-memory copy."""
    directory.mkdir(parents=True, exist_ok=True)
    a, b = directory / "disk_test_a.bin", directory / "disk_test_b.bin"
    data = np.random.default_rng(0).bit_generator.random_raw(block // 8).view(np.uint8)
    buffer = bytearray(block)
    blocks = max(1, size // block)
    size = blocks * block
    result = {"bytes": size}
    try:
        start = time.perf_counter()
        with open(a, "wb") as f:
            for _ in range(blocks):
                f.write(data)
            f.flush()
            os.fsync(f.fileno())
        result["write"] = size / (time.perf_counter() - start) / GB

        def read(path: Path) -> float:
            start = time.perf_counter()
            with open(path, "rb", buffering=0) as f:
                while f.readinto(buffer):
                    pass
            return size / (time.perf_counter() - start) / GB

        evict(a)
        result["read_cold"] = read(a)
        evict(a)
        start = time.perf_counter()
        with open(a, "rb", buffering=0) as src, open(b, "wb", buffering=0) as dst:
            while n := src.readinto(buffer):
                dst.write(memoryview(buffer)[:n])
            os.fsync(dst.fileno())
        result["copy_cold"] = size / (time.perf_counter() - start) / GB
        read(b)  # b's pages are in the cache after the write; one pass to be sure
        result["read_warm"] = read(b)
    finally:
        a.unlink(missing_ok=True)
        b.unlink(missing_ok=True)
    src = np.frombuffer(np.random.default_rng(1).bit_generator.random_raw(size // 8 // 4), np.uint8)
    dst = np.empty_like(src)
    np.copyto(dst, src)
    start = time.perf_counter()
    for _ in range(3):
        np.copyto(dst, src)
    result["memcpy"] = 3 * src.nbytes / (time.perf_counter() - start) / GB
    del src, dst  # keep this process small: its children are forked from it
    return result


# ----- the child process -----

def mem_available() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


class Sampler(threading.Thread):
    """Peaks of VmRSS, RssAnon, RssFile (bytes) of a process, sampled from /proc/PID/status.

    A watchdog too: SIGKILLs the process (ours) when its RssAnon passes `max_anon` or the machine's MemAvailable
    drops below `min_available`, so that a converter that needs more memory than there is fails alone, measured,
    instead of dragging the machine into the OOM killer. `killed` then says why.
    """

    FIELDS = ("VmRSS", "RssAnon", "RssFile", "RssShmem", "VmHWM")

    def __init__(self, pid: int, interval: float = 0.01, max_anon: int | None = None, min_available: int = 0):
        super().__init__(daemon=True)
        self.pid, self.path, self.interval = pid, Path(f"/proc/{pid}/status"), interval
        self.max_anon, self.min_available = max_anon, min_available
        self.peak = dict.fromkeys(self.FIELDS, 0)
        self.killed: str | None = None
        self.stop = threading.Event()

    def watchdog(self, anon: int) -> None:
        reason = None
        if self.max_anon is not None and anon > self.max_anon:
            reason = f"RssAnon {anon / GB:.2f} GB passed --max-anon-gb {self.max_anon / GB:g}"
        elif self.min_available and (available := mem_available()) < self.min_available:
            reason = (f"MemAvailable {available / GB:.2f} GB fell below --min-available-gb "
                      f"{self.min_available / GB:g} (child RssAnon {anon / GB:.2f} GB)")
        if reason and self.killed is None:
            self.killed = reason
            os.kill(self.pid, signal.SIGKILL)

    def run(self):
        while not self.stop.is_set():
            try:
                text = self.path.read_text()
            except (FileNotFoundError, ProcessLookupError, PermissionError):
                return
            for line in text.splitlines():
                key, _, value = line.partition(":")
                if key in self.peak and value.strip():
                    self.peak[key] = max(self.peak[key], int(value.split()[0]) * 1024)
                    if key == "RssAnon":
                        self.watchdog(int(value.split()[0]) * 1024)
            self.stop.wait(self.interval)


def run_child(argv: list[str], output: Path | None = None, **limits) -> dict:
    """Run `argv`; wall time to exit and (if `output`) until it is fsync'd, rusage, sampled RSS peaks.

    `limits`: Sampler's max_anon / min_available watchdog."""
    start = time.perf_counter()
    child = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=REPO)
    sampler = Sampler(child.pid, **limits)
    sampler.start()
    log = child.stdout.read().decode(errors="replace")  # until the child closes it (exits)
    _, status, usage = os.wait4(child.pid, 0)
    wall = time.perf_counter() - start
    child.returncode = os.waitstatus_to_exitcode(status)
    sampler.stop.set()
    sampler.join()
    result = {"argv": argv, "rc": child.returncode, "log": log, "wall": wall, "killed": sampler.killed,
              # ru_maxrss is not used: Linux folds the forking parent's RSS into the child's (the vfork'd mm's
              # high-water mark is recorded at exec), so it reads at least this process's RSS.
              "cpu": usage.ru_utime + usage.ru_stime, "ru_maxrss": usage.ru_maxrss * 1024,
              "read_disk": usage.ru_inblock * 512, "written_disk": usage.ru_oublock * 512,
              "majflt": usage.ru_majflt, **{f"peak_{k}": v for k, v in sampler.peak.items()}}
    result["maxrss"] = result["peak_VmHWM"]  # the high-water mark is monotonic: the last sample is the peak
    if output is not None and child.returncode == 0:
        fsync_tree(output)
        result["durable"] = time.perf_counter() - start
    return result


# ----- sizes -----

def sizes(config, itemsize: int) -> dict:
    maps = tensor_mappings(config)
    layers = config.num_hidden_layers
    per_leaf = {"/".join(m.path): int(np.prod(m.shape)) * (layers if m.stacked else 1) * itemsize for m in maps}
    largest = max(per_leaf, key=per_leaf.get)
    layer_tensor = max(int(np.prod(m.hf_shape)) * itemsize for m in maps if m.stacked)
    return {"model": sum(per_leaf.values()), "largest_leaf": largest, "largest": per_leaf[largest],
            "largest_layer_tensor": layer_tensor}


def verify_roundtrip(src: Path, exported: Path) -> str:
    """'bit-exact (N tensors)' if every tensor of `src` is in `exported` with the same dtype, shape and bytes."""
    from llama_jax.checkpoints import HFCheckpoint

    a, b = HFCheckpoint(src), HFCheckpoint(exported)
    names = a.names()
    if sorted(names) != sorted(b.names()):
        return f"DIFFERENT tensor names: only in source {sorted(set(names) - set(b.names()))[:3]}, " \
               f"only in export {sorted(set(b.names()) - set(names))[:3]}"
    for name in names:
        x, y = a.get(name), b.get(name)
        if x.dtype != y.dtype or x.shape != y.shape or x.tobytes() != y.tobytes():
            return f"DIFFERENT: {name} {x.dtype}{x.shape} vs {y.dtype}{y.shape}"
    return f"bit-exact ({len(names)} tensors)"


# ----- report -----

def gb(n: float) -> str:
    return f"{n / GB:.2f} GB"


def table(rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(rows[0]) + " |", "|" + "|".join(" --- " for _ in rows[0]) + "|"]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows[1:]])


def details(info: dict) -> list[str]:
    """The source, the disk's limits, the table of both directions and the round-trip check, as markdown lines."""
    s, disk, runs = info["sizes"], info["disk"], info["runs"]

    def span(key: str) -> str:
        values = sorted(d[key] for d in info.get("disk_runs", [disk]))
        return f"{values[0]:.2f}" if len(values) == 1 or f"{values[0]:.2f}" == f"{values[-1]:.2f}" \
            else f"{values[0]:.2f}–{values[-1]:.2f}"

    lines = [f"- source: {gb(info['source_bytes'])} in {info['source_files']} safetensors files; model "
             f"{gb(s['model'])} in {info['dtype']}; largest stacked tensor `{s['largest_leaf']}` "
             f"{gb(s['largest'])} (largest per-layer tensor {s['largest_layer_tensor'] / 2**20:.0f} MiB)"
             + (f"; checkpoint on disk {gb(info['ckpt_bytes'])}" if info.get("ckpt_bytes") else "")
             + f"; workdir {info['filesystem']}",
             f"- disk ({gb(disk['bytes'])} file, 64 MiB blocks; before and after the conversions): write+fsync "
             f"{span('write')} GB/s, cold read {span('read_cold')} GB/s, cold copy (read+write+fsync) "
             f"{span('copy_cold')} GB/s, warm read {span('read_warm')} GB/s, memcpy {span('memcpy')} GB/s",
             f"- baseline: a child that only imports the converter peaks at {gb(info['baseline']['maxrss'])} RSS", ""]
    rows = [["direction", "wall s", "durable s", "GB/s", "of best cold copy", "CPU s", "peak RSS", "peak RssAnon",
             "peak RssFile", "RSS / model", "RSS / largest", "RssAnon / largest", "disk read",
             "disk written"]]
    for name, r in runs.items():
        if r["rc"] != 0:  # the memory columns are lower bounds (at the kill / the failure)
            rows.append([name, f"{r['wall']:.1f}", "KILLED" if r["killed"] else f"FAILED rc={r['rc']}", "-", "-",
                         f"{r['cpu']:.1f}", "≥ " + gb(r["maxrss"]), "≥ " + gb(r["peak_RssAnon"]),
                         "≥ " + gb(r["peak_RssFile"]), f"≥ {r['maxrss'] / s['model']:.2f}",
                         f"≥ {r['maxrss'] / s['largest']:.2f}", f"≥ {r['peak_RssAnon'] / s['largest']:.2f}",
                         gb(r["read_disk"]), gb(r["written_disk"])])
            continue
        rate = s["model"] / r["wall"] / GB
        rows.append([name, f"{r['wall']:.1f}", f"{r['durable']:.1f}", f"{rate:.3f}",
                     f"{rate / disk['copy_cold']:.0%}", f"{r['cpu']:.1f}", gb(r["maxrss"]), gb(r["peak_RssAnon"]),
                     gb(r["peak_RssFile"]), f"{r['maxrss'] / s['model']:.2f}", f"{r['maxrss'] / s['largest']:.2f}",
                     f"{r['peak_RssAnon'] / s['largest']:.2f}",
                     gb(r["read_disk"]), gb(r["written_disk"])])
    lines += [table(rows), ""]
    if info.get("verify"):
        lines.append(f"- round trip (export vs source): {info['verify']}")
    for name, r in runs.items():
        if r["killed"]:
            lines.append(f"- {name} KILLED by the bench's watchdog after {r['wall']:.0f} s: {r['killed']}")
        elif r["rc"] != 0:
            lines += [f"- {name} FAILED (rc {r['rc']}), last output:", "", "```",
                      "\n".join(r["log"].splitlines()[-30:]), "```"]
    lines += [f"- note: {n}" for n in info.get("notes", [])]
    return lines


def report(info: dict) -> str:
    """A whole dated entry for the "Checkpoint conversion" section (the standalone command's record)."""
    m = info["machine"]
    lines = [f"### {info['date']} — {info['preset']} shape, {info['dtype']} (synthetic weights)", "",
             f"- machine: {m['nproc']} CPUs ({m['affinity']} usable), {m['ram'] / 2**30:.1f} GiB RAM, {m['cpu']}, "
             f"Linux {m['kernel']}, Python {m['python']}",
             f"- load average (1 min) at start / end: {info['load'][0]:.1f} / {info['load'][1]:.1f} "
             f"(other work on the machine slows the timings; the memory numbers are the child's own)",
             "- versions: " + ", ".join(f"{k} {v}" for k, v in info["versions"].items()),
             f"- command: `{info['command']}`"]
    return "\n".join(lines + details(info)) + "\n"


# ----- main -----

def measure(preset: str, workdir: Path, command: str, *, src: Path | None = None, dtype: str = "bfloat16",
            disk_test_gb: float = 2.0, verify: bool = True, keep: bool = False, max_anon_gb: float | None = None,
            min_available_gb: float = 1.5, log=lambda message: print(message, file=sys.stderr)) -> dict:
    """The source `src` (default: a synthetic `preset` checkpoint made in `workdir`), the disk's limits, both
    conversions, the round-trip check, the disk again. Returns the figures `details` and `report` render. What it
    makes in `workdir` is removed afterwards unless `keep`. A source that is not an HF checkpoint is an InputError
    before anything is measured."""
    created = not Path(workdir).exists()
    workdir = writable_directory(workdir)
    info = {"date": datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"), "machine": machine(),
            "filesystem": filesystem(workdir), "versions": versions(), "preset": preset, "command": command,
            "runs": {}, "notes": [], "load": [os.getloadavg()[0]] * 2}
    made = []
    try:
        if src is None:
            src = workdir / f"hf_src_{preset}"
            log(f"making a synthetic {preset} checkpoint in {src}")
            shutil.rmtree(src, ignore_errors=True)
            made.append(src)
            subprocess.run([sys.executable, str(HERE / "make_synthetic_hf.py"), "--preset", preset,
                            "--dtype", dtype, str(src)], check=True)
        src = src.absolute()
        config = llama_jax.LlamaConfig.load(src)
        from llama_jax.checkpoints import HFCheckpoint
        source_dtype = HFCheckpoint(src).dtype()
        info["dtype"] = source_dtype.name
        info["sizes"] = sizes(config, source_dtype.itemsize)
        info["source_bytes"] = tree_bytes(src)
        info["source_files"] = len(list(src.glob("*.safetensors")))

        log(f"disk bandwidth ({disk_test_gb:g} GB in {workdir})")
        info["disk"] = disk_bandwidth(workdir, int(disk_test_gb * GB))

        info["baseline"] = run_child([sys.executable, "-c", "import llama_jax.checkpoints, convert.__main__"])

        ckpt, exported = workdir / "ckpt", workdir / "hf_export"
        made += [ckpt, exported]
        for name, argv_, out, inp in (("hf -> ckpt", ["hf", str(src), str(ckpt)], ckpt, src),
                                      ("ckpt -> hf (export)", ["export", str(ckpt), str(exported)], exported, ckpt)):
            if name.startswith("ckpt") and info["runs"]["hf -> ckpt"]["rc"] != 0:
                break
            evict(inp)
            log(f"{name}: python -m convert {' '.join(argv_)} --force")
            r = run_child([sys.executable, "-m", "convert", *argv_, "--force"], out,
                          max_anon=int(max_anon_gb * GB) if max_anon_gb else None,
                          min_available=int(min_available_gb * GB))
            info["runs"][name] = r
            log(f"  rc {r['rc']}, {r['wall']:.1f} s, peak RSS {gb(r['maxrss'])}"
                + (f", KILLED: {r['killed']}" if r["killed"] else ""))
            if r["rc"] != 0:
                log(r["log"])
        if info["runs"]["hf -> ckpt"]["rc"] == 0:
            info["ckpt_bytes"] = tree_bytes(ckpt)
        if verify and all(r["rc"] == 0 for r in info["runs"].values()) and len(info["runs"]) == 2:
            log("checking the round trip")
            info["verify"] = verify_roundtrip(src, exported)
        log("disk bandwidth again")
        after = disk_bandwidth(workdir, int(disk_test_gb * GB))
        info["disk_runs"] = [info["disk"], after]
        info["load"][1] = os.getloadavg()[0]
        info["disk"] = {k: max(info["disk"][k], after[k]) for k in after}  # the best of the two: the ceiling
        if info["disk"]["read_cold"] > 2 * info["disk"]["write"]:
            info["notes"].append("cold reads are much faster than fsync'd writes: the VM host may be caching reads "
                                 "that the guest's page cache no longer holds")
    finally:
        if not keep:
            for path in made:
                shutil.rmtree(path, ignore_errors=True)
                shutil.rmtree(path.parent / f".{path.name}.partial", ignore_errors=True)
            if created and not any(workdir.iterdir()):  # nor the workdir, when this run made it
                workdir.rmdir()
    return info


def writable_directory(path: Path) -> Path:
    """`path`, absolute, created if missing; an InputError naming it if it cannot be created or written."""
    path = Path(path).absolute()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise InputError(path, f"cannot be created ({e.strerror})") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise InputError(path, "is not writable")
    return path


def succeeded(info: dict) -> bool:
    return all(r["rc"] == 0 for r in info["runs"].values())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="llama3.2-1b", choices=PRESETS)
    parser.add_argument("--src", type=Path, help="an existing HF directory (default: make a synthetic one)")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/llama_jax_convert_bench"))
    parser.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default="bfloat16",
                        help="dtype of the synthetic source (the conversion keeps the source's)")
    parser.add_argument("--disk-test-gb", type=float, default=2.0)
    parser.add_argument("--record", type=Path, help="markdown file to add the dated entry to (e.g. BENCHMARKS.md)")
    parser.add_argument("--no-verify", action="store_true", help="skip the bit-exact round-trip check")
    parser.add_argument("--keep", action="store_true", help="keep the workdir's checkpoints afterwards")
    parser.add_argument("--max-anon-gb", type=float, help="kill a converter whose anonymous RSS passes this")
    parser.add_argument("--min-available-gb", type=float, default=1.5,
                        help="kill a converter when the machine's MemAvailable drops below this (default 1.5)")
    args = parser.parse_args(argv)
    command = shlex.join(["python", "bench/convert_bench.py", *(sys.argv[1:] if argv is None else argv)])
    return exit_code(lambda: run(args, command), interrupted="interrupted")


def run(args, command: str) -> int:
    info = measure(args.preset, args.workdir, command, src=args.src, dtype=args.dtype,
                   disk_test_gb=args.disk_test_gb, verify=not args.no_verify, keep=args.keep,
                   max_anon_gb=args.max_anon_gb, min_available_gb=args.min_available_gb)
    entry = report(info)
    print("\n" + entry)
    if args.record:
        record(args.record, entry, SECTION, SECTION_INTRO)
        print(f"recorded in {args.record}", file=sys.stderr)
    return 0 if succeeded(info) else 1


if __name__ == "__main__":
    sys.exit(main())

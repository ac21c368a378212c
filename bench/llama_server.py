"""llama.cpp's own C++ `llama-server` (continuous batching, `--parallel N`, prompt caching): the serving peer.

pip installs no server binary; llama-cpp-python's sdist vendors llama.cpp's source (`vendor/llama.cpp`, with
`tools/server`). `python -m bench.llama_server [--cache-dir DIR]` downloads that sdist (pip, no binary wheels) and
builds the `llama-server` target with CMake once into the cache directory (about 10 minutes on 2 cores); later
calls return the binary at once. `llama_server(cache_dir)` does the same from Python.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

from bench.common import logger

VERSION = "0.3.36"  # the llama-cpp-python release whose vendored llama.cpp is built (the bench extra's version)
CMAKE_FLAGS = ["-DLLAMA_BUILD_SERVER=ON", "-DLLAMA_USE_PREBUILT_UI=OFF", "-DLLAMA_OPENSSL=OFF",
               "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_CURL=OFF", "-DCMAKE_BUILD_TYPE=Release",
               "-DBUILD_SHARED_LIBS=OFF"]  # one self-contained binary: the build tree is removed after
log = logger("llama-server")


def llama_server(cache_dir: Path) -> Path:
    """The llama-server binary built from llama-cpp-python VERSION's sdist under cache_dir (built once)."""
    root = cache_dir / f"llama-server-{VERSION}"
    binary = root / "llama-server"
    if binary.exists():
        return binary
    work = root.parent / f"{root.name}.partial"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    log(f"downloading the llama-cpp-python {VERSION} sdist")
    subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
                    f"llama-cpp-python=={VERSION}", "-d", str(work)], check=True)
    with tarfile.open(next(work.glob("llama_cpp_python-*.tar.gz"))) as archive:
        archive.extractall(work, filter="data")
    source = next(work.glob("llama_cpp_python-*")) / "vendor" / "llama.cpp"
    log(f"building llama-server from {source} (about 10 minutes on 2 cores)")
    build = work / "build"
    with open(work / "build.log", "w") as output:  # the compiler's warnings go there, not to the terminal
        for command in (["cmake", "-S", str(source), "-B", str(build), *CMAKE_FLAGS],
                        ["cmake", "--build", str(build), "-t", "llama-server", "-j", str(os.cpu_count() or 1)]):
            if subprocess.run(command, stdout=output, stderr=subprocess.STDOUT).returncode:
                raise RuntimeError(f"{' '.join(command[:3])} failed; see {work / 'build.log'}")
    built = next(build.rglob("llama-server"))
    root.mkdir(parents=True, exist_ok=True)
    shutil.copy2(built, binary)
    shutil.rmtree(work)
    return binary


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.llama_server", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cache-dir", type=Path, default=Path.home() / ".cache" / "llama_jax" / "bench")
    print(llama_server(p.parse_args(argv).cache_dir))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

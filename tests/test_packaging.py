"""The package's metadata resolves where users install it: beside the newest jax the ranges admit (on the Python it
needs), and with each accelerator extra at the locked jax. pip resolves against the package index without
installing anything (`--dry-run --report`); the four resolutions run at once. The project's own metadata is prepared
by the setuptools installed here (`--no-build-isolation`, setuptools being a test dependency), not in a fresh build
environment per resolution: a third of each resolution's CPU time."""

import concurrent.futures
import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # pip resolving against the index: about 40 s of CPU

REPO = Path(__file__).resolve().parents[1]
# The other end of the ranges in pyproject.toml: jax 0.12 needs Python >= 3.12 (constraints-upper.txt).
UPPER = {"jax": "0.12.0.1", "jaxlib": "0.12.0.1", "flax": "0.12.12", "optax": "0.2.8", "orbax-checkpoint": "0.12.8"}
EXTRAS = {"cuda12": {"jax-cuda12-plugin", "jax-cuda12-pjrt"}, "cuda13": {"jax-cuda13-plugin", "jax-cuda13-pjrt"},
          "tpu": {"libtpu"}}


def resolve(tmp_path: Path, *args) -> dict[str, str]:
    """{name: version} (names normalized) of what `pip install --dry-run ARGS` would install (nothing is)."""
    report = tmp_path / "report.json"
    result = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--quiet", "--ignore-installed",
                             "--no-build-isolation", "--report", str(report), *args], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    installs = json.loads(report.read_text())["install"]
    return {item["metadata"]["name"].lower().replace("_", "-"): item["metadata"]["version"] for item in installs}


@pytest.fixture(scope="module")
def resolutions(tmp_path_factory):
    """"upper" and each extra -> a future of its resolution, all started at once."""
    def directory(name):
        return tmp_path_factory.mktemp(name)

    upper = directory("upper")
    pins = [f"{name}=={version}" for name, version in UPPER.items()]
    # pip resolves for another interpreter only with --target and binary packages (pip >= 26 applies
    # --python-version to Requires-Python and markers; the test extra brings such a pip).
    jobs = {"upper": (upper, "--target", str(upper / "never"), "--python-version", "3.12", "--only-binary=:all:",
                      ".", *pins)}
    jobs |= {extra: (directory(extra), "-c", "constraints.txt", f".[{extra}]") for extra in EXTRAS}
    with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
        yield {name: pool.submit(resolve, *args) for name, args in jobs.items()}


def test_installs_beside_the_newest_jax_on_python_3_12(resolutions):
    got = resolutions["upper"].result()
    assert "llama-jax" in got
    assert {name: got[name] for name in UPPER} == UPPER


@pytest.mark.parametrize("extra", EXTRAS)
def test_each_accelerator_extra_brings_its_plugin_at_the_locked_jax(resolutions, extra):
    locked = dict(line.split("==") for line in (REPO / "constraints.txt").read_text().splitlines()
                  if "==" in line and not line.startswith("#"))
    got, plugins = resolutions[extra].result(), EXTRAS[extra]
    assert got["jax"] == got["jaxlib"] == locked["jax"]
    assert plugins <= set(got), sorted(got)
    for plugin in plugins - {"libtpu"}:  # jax pins its GPU plugin to its own version
        assert got[plugin] == locked["jax"], (plugin, got[plugin])

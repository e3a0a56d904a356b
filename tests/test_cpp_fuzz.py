"""A bounded libFuzzer pass over the C++ host's manifest and recording readers (issue 18 §2).

Builds runtime/cpp/fuzz/manifest_fuzzer.cpp with clang (-fsanitize=fuzzer,address,undefined) and
runs it for FUZZ_SECONDS from the committed seed corpus (runtime/cpp/fuzz/corpus: hand-made
manifests, a recording and the tiny export's manifest) with the dictionary beside it. Any crash,
leak, timeout, out-of-memory or sanitizer report fails the test, and the input that caused it is
named. Skipped where clang or its libFuzzer runtime (Debian: clang libclang-rt-dev) is missing,
except in CI (``CI`` set), where that fails: .ci/run installs them.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from cpp_helpers import SOURCE, build

FUZZ_SECONDS = int(os.environ.get("KTRT_FUZZ_SECONDS", "45"))


def _require_libfuzzer(tmp_path: Path) -> None:
    """clang alone is not enough: libFuzzer's runtime is a separate Debian package."""
    probe = tmp_path / "probe.cpp"
    probe.write_text('#include <cstddef>\n#include <cstdint>\n'
                     'extern "C" int LLVMFuzzerTestOneInput(const uint8_t*, size_t) { return 0; }\n')
    clang = shutil.which("clang++")
    done = clang and subprocess.run([clang, "-fsanitize=fuzzer,address,undefined", str(probe), "-o",
                                     str(tmp_path / "probe")], capture_output=True, text=True, timeout=120)
    if not done or done.returncode != 0:
        message = "the fuzz pass needs clang++ and libFuzzer's runtime (apt-get install clang libclang-rt-dev)"
        if os.environ.get("CI"):
            pytest.fail(message + (f": {done.stderr[-500:]}" if done else ""))
        pytest.skip(message)


def test_bounded_fuzz_pass_finds_nothing(tmp_path):
    _require_libfuzzer(tmp_path)
    fuzzer = build(tmp_path / "build", "clang++", "-DKTRT_FUZZ=ON") / "ktrt_manifest_fuzzer"
    corpus, artifacts = tmp_path / "corpus", tmp_path / "crashes"
    corpus.mkdir()
    artifacts.mkdir()
    command = [str(fuzzer), str(corpus), str(SOURCE / "fuzz" / "corpus"), f"-dict={SOURCE / 'fuzz' / 'manifest.dict'}",
               f"-max_total_time={FUZZ_SECONDS}", "-timeout=10", "-rss_limit_mb=2048", "-max_len=32768",
               f"-artifact_prefix={artifacts}/", "-print_final_stats=1"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=FUZZ_SECONDS + 120,
                          env={**os.environ, "ASAN_OPTIONS": "detect_leaks=1"})
    log = done.stderr[-4000:]
    found = sorted(p.name for p in artifacts.iterdir())
    assert done.returncode == 0 and not found, f"the fuzzer found {found}:\n{log}"
    runs = re.search(r"stat::number_of_executed_units:\s*(\d+)", done.stderr)
    assert runs and int(runs.group(1)) > 100, log  # it really ran
    for marker in ("ERROR: AddressSanitizer", "ERROR: LeakSanitizer", "runtime error:"):
        assert marker not in done.stderr, log

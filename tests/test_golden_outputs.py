"""Refactors keep every output bit-identical: all pipelines against outputs recorded before (issue 19).

The outputs in ``tests/golden/`` were recorded on the main branch before the per-row contract and
the loop of slots (``KTRT_RECORD_GOLDEN=1 pytest tests/test_golden_outputs.py`` re-records them;
do that only for an intended change of results, and say so in the commit). Three artifacts sets:
fp32 with four profiles (64x64 and 64x128, batches 1 and 2: rows split over both batches), fp16
64x64 batch 1 (dynamo exporter) and fp16 64x128 batch 2; all on ONNX Runtime's CPU provider.

Bit identity is asserted on a CPU of the class the outputs were recorded on (the same vector
features, which pick ONNX Runtime's kernels). On another class of CPU the kernels may round
differently, so there the outputs must agree to 2e-5 (and the test says which check it made).
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from golden_outputs import GOLDEN, assert_equals_recorded, cpu_class, digest, run_cases

SETS = {"fp32_multi": "artifacts_fp32_multi", "fp16": "artifacts_fp16", "fp16_b2_wide": "artifacts_fp16_b2_wide"}
RECORD = os.environ.get("KTRT_RECORD_GOLDEN") == "1"


@pytest.mark.parametrize("name", sorted(SETS))
def test_outputs_are_bit_identical_to_the_recorded_ones(name, request):
    artifacts, _ = request.getfixturevalue(SETS[name])
    from kandinsky_trt.runtime.contract.manifest import load_manifest

    outputs = run_cases(artifacts, load_manifest(artifacts).sizes())
    index_file, arrays_file = GOLDEN / f"{name}.json", GOLDEN / f"{name}.npz"
    if RECORD:
        GOLDEN.mkdir(exist_ok=True)
        index_file.write_text(json.dumps({"cpu_class": cpu_class(),
                                          "digests": {k: digest(v) for k, v in sorted(outputs.items())}}, indent=1))
        np.savez_compressed(arrays_file, **outputs)
    assert_equals_recorded(name, outputs, "the output")

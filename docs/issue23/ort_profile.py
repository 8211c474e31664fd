"""ONNX Runtime's profiler: kernel time per op type of group 0's per-group session against the single engine bound
to group 0 (batch 2, 30 runs). Usage: PYTHONPATH=<checkout> python docs/issue23/ort_profile.py BUNDLE"""

import collections
import json
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort

from runtime.bundle import load_bundle
from runtime.engine import input_feeds
from runtime.single_engine import single_graph

RUNS = 30
bundle = load_bundle(sys.argv[1])
x = np.random.default_rng(0).standard_normal((2, *bundle.spec.sample_shape)).astype(np.float32)
feeds = input_feeds(bundle.spec, x, np.zeros(2, np.int64), np.arange(2) % 10)


def kernel_ms(model_bytes: bytes, extra: dict) -> collections.Counter:
    opts = ort.SessionOptions()
    opts.enable_profiling, opts.log_severity_level = True, 3
    opts.add_session_config_entry("session.model_external_initializers_file_folder_path", str(bundle.root))
    session = ort.InferenceSession(model_bytes, opts, providers=["CPUExecutionProvider"])
    for _ in range(RUNS):
        session.run(["eps"], feeds | extra)
    per_op = collections.Counter()
    trace = Path(session.end_profiling())
    for e in json.loads(trace.read_text()):
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            per_op[e["args"]["op_name"]] += e["dur"] / 1e3 / RUNS
    trace.unlink()
    return per_op


graph, tables = single_graph(bundle)
per_group = kernel_ms(bundle.group_model(0).SerializeToString(), {})
single = kernel_ms(graph.SerializeToString(), {k: np.asarray(v[0]) for k, v in tables.items()})
for op in sorted(set(per_group) | set(single), key=lambda k: -max(per_group[k], single[k]))[:10]:
    print(f"{op:28s} per-group {per_group[op]:7.3f} ms  single {single[op]:7.3f} ms")
print("total ms per call", round(sum(per_group.values()), 3), round(sum(single.values()), 3))

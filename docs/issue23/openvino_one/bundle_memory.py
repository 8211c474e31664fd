"""Resident memory of one bundle on OpenVINO, each configuration in a fresh process: RSS growth from loading the
engines to having run a step every 10 timesteps (so every group), after the CPU plugin is loaded. Configurations
MODE:BATCH with MODE g1 (every step routed to group 0: one compiled model), single (one compiled model for all
groups, the default) or per (one compiled model per group).
Usage: PYTHONPATH=<checkout> python docs/issue23/openvino_one/bundle_memory.py BUNDLE g1:1 single:1 per:1 ..."""

import subprocess
import sys

code = r"""
import sys, numpy as np
def rss(): return next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmRSS'))/1024
from runtime.bundle import load_bundle
from runtime.engine import example_cond
from runtime.openvino import core
import openvino as ov
b = load_bundle(sys.argv[1]); mode = sys.argv[2]
n = int(sys.argv[3]); rng = np.random.default_rng(0)
x = rng.standard_normal((n, *b.spec.sample_shape)).astype(np.float32); cond = example_cond(b.spec, n, rng)
p = ov.opset13.parameter([1, 4], ov.Type.f32); m = ov.Model([ov.opset13.relu(p)], [p])
core().compile_model(m, "CPU").create_infer_request().infer({0: np.zeros((1, 4), np.float32)})  # the plugin loaded
before = rss()
route = np.zeros_like(b.group_of_t) if mode == "g1" else None
es = b.engines(backend="openvino", single={"single": None, "per": False, "g1": False}[mode], route=route)
groups = sorted({int(v) for v in (b.group_of_t if route is None else route)})
for t0 in range(0, len(b.group_of_t), 10):
    es.for_timestep(t0).infer(x, np.full(n, t0, np.int64), cond)
print(round(rss() - before, 1))
"""
for cfg in sys.argv[2:]:
    out = subprocess.run([sys.executable, "-c", code, sys.argv[1], *cfg.split(":")], capture_output=True, text=True)
    print(cfg, out.stdout.strip()[-200:] or out.stderr[-500:], flush=True)

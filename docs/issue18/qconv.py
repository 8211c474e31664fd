"""QLinearConv alone on ONNX Runtime: symmetric weights (zero point 0) vs a weight zero point of 1, against the float
Conv, at CIFAR-10-shaped widths. Usage: python docs/issue18/qconv.py INPUT_ZERO_POINT BATCH"""

import sys
import time

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper


def model(c, hw, batch, wzp, kind):
    rng = np.random.default_rng(0)
    w = rng.integers(-100, 100, (c, c, 3, 3)).astype(np.int8)
    x = helper.make_tensor_value_info("x", TensorProto.UINT8 if kind == "q" else TensorProto.FLOAT, [batch, c, hw, hw])
    y = helper.make_tensor_value_info("y", TensorProto.UINT8 if kind == "q" else TensorProto.FLOAT, None)
    if kind == "q":
        inits = [
            numpy_helper.from_array(np.array(0.02, np.float32), "xs"),
            numpy_helper.from_array(np.array(XZ, np.uint8), "xz"),
            numpy_helper.from_array(w, "w"),
            numpy_helper.from_array(np.full(c, 0.01, np.float32), "ws"),
            numpy_helper.from_array(np.full(c, wzp, np.int8), "wz"),
            numpy_helper.from_array(np.array(0.05, np.float32), "ys"),
            numpy_helper.from_array(np.array(128, np.uint8), "yz"),
        ]
        node = helper.make_node("QLinearConv", ["x", "xs", "xz", "w", "ws", "wz", "ys", "yz"], ["y"], pads=[1, 1, 1, 1])
    else:
        inits = [numpy_helper.from_array(w.astype(np.float32) * 0.01, "w")]
        node = helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1])
    g = helper.make_graph([node], "g", [x], [y], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 9
    return m.SerializeToString()


def time_it(sess, feed, reps=30):
    sess.run(None, feed)
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        sess.run(None, feed)
        ts.append(time.perf_counter() - t)
    return 1e3 * float(np.median(ts))


XZ = int(sys.argv[1])
B = int(sys.argv[2])
for c, hw, batch in ((128, 32, B), (256, 16, B)):
    opts = ort.SessionOptions()
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    rng = np.random.default_rng(1)
    xq = rng.integers(0, 255, (batch, c, hw, hw)).astype(np.uint8)
    xf = (xq.astype(np.float32) - 128) * 0.02
    res = {}
    for name, (kind, wzp) in {"float": ("f", 0), "q sym": ("q", 0), "q wzp=1": ("q", 1)}.items():
        s = ort.InferenceSession(model(c, hw, batch, wzp, kind), opts, providers=["CPUExecutionProvider"])
        res[name] = time_it(s, {"x": xq if kind == "q" else xf})
    print(
        f"C={c} HW={hw} B={batch}: "
        + ", ".join(f"{k} {v:.2f} ms" for k, v in res.items())
        + f"; float/sym {res['float'] / res['q sym']:.2f}x, float/wzp1 {res['float'] / res['q wzp=1']:.2f}x"
    )

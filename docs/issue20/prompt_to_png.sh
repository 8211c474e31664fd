#!/bin/bash
# Issue 20: one whole prompt-to-PNG call on the SD-1.5-shaped pipeline (random weights): tokenize, encode the
# prompt and the negative prompt, DDIM with guidance 7.5, VAE decode, write the .npz and the PNG. Full precision
# (the pipeline directory itself, diffusers' modules on torch) against our W8A8 bundle on ONNX Runtime and on
# OpenVINO; each is one `dqc sample` process, so its wall time includes starting and loading. Wall time and peak
# resident memory from /usr/bin/time; the request's own seconds (encode, sample, decode) from the .npz.
# Usage: PYTHONPATH=<checkout> bash docs/issue20/prompt_to_png.sh WORKDIR [STEPS]
# WORKDIR/pipe and WORKDIR/bundle are made as docs/issue20/sd15.sh makes them, where missing.
set -e
W=${1:?WORKDIR}
STEPS=${2:-50}
[ -d "$W/pipe" ] || python -c "from tools.bench.synthetic import save_text_pipeline; save_text_pipeline('$W/pipe', 'sd15', 0)"
if [ ! -f "$W/bundle/manifest.json" ]; then
  printf 'a handwritten 7\nthe digit seven\na photo of a cat\nan oil painting of a harbour\n' > "$W/prompts.txt"
  dqc compile "$W/pipe" -o "$W/bundle" --calib-prompts "$W/prompts.txt" --method naive --steps 4 \
    --calib-samples 2 --calib-timesteps 2 --guidance 7.5 --batch-size 4 -q
fi
run() {  # NAME SOURCE [dqc sample flags...]
  local name=$1 src=$2
  shift 2
  /usr/bin/time -v dqc sample "$src" -o "$W/$name.npz" --png "$W/$name.png" --prompt "a photo of a cat" \
    --negative-prompt "blurry" -n 1 --steps "$STEPS" --guidance 7.5 --seed 0 -q "$@" 2> "$W/$name.time" > "$W/$name.out"
  python - "$W" "$name" <<'PY'
import json, re, sys
import numpy as np
w, name = sys.argv[1:]
t = open(f"{w}/{name}.time").read()
wall = re.search(r"Elapsed \(wall clock\) time.*: (\S+)", t).group(1)
rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", t).group(1)) / 1024
meta = json.loads(str(np.load(f"{w}/{name}.npz")["meta"]))
print(json.dumps({"run": name, "wall": wall, "peak_rss_mb": round(rss), "request_seconds": meta["seconds"],
                  "engine": meta["engine"].get("backend")}))
PY
}
run fp32-torch "$W/pipe"
run ours-ort "$W/bundle" --backend ort
run ours-openvino "$W/bundle" --backend openvino
python - "$W" <<'PY'
import sys
import numpy as np
w = sys.argv[1]
fp = np.load(f"{w}/fp32-torch.npz")["samples"].astype(np.float64)
for name in ("ours-ort", "ours-openvino"):
    s = np.load(f"{w}/{name}.npz")["samples"].astype(np.float64)
    print(name, "PSNR vs full precision (pooled, 10*log10(4/MSE)):", round(float(10 * np.log10(4 / np.mean((s - fp) ** 2))), 2))
PY

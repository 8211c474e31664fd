#!/bin/bash
# The SD-1.5-shaped pipeline (random weights) compiled through the > 2 GiB path, linted, and timed.
# Usage: PYTHONPATH=<checkout> bash docs/issue20/sd15.sh WORKDIR
set -e
W=${1:?WORKDIR}
python -c "from tools.bench.synthetic import save_text_pipeline; save_text_pipeline('$W/pipe', 'sd15', 0)"
printf 'a handwritten 7\nthe digit seven\na photo of a cat\nan oil painting of a harbour\n' > "$W/prompts.txt"
/usr/bin/time -v dqc compile "$W/pipe" -o "$W/bundle" --calib-prompts "$W/prompts.txt" --method naive --steps 4 \
  --calib-samples 2 --calib-timesteps 2 --guidance 7.5 --batch-size 4 -q 2> "$W/compile.time"
grep -E "Elapsed|Maximum resident" "$W/compile.time"
dqc lint "$W/bundle"
python "$(dirname "$0")/sd15_step.py" "$W/pipe" "$W/bundle" "$W/step"

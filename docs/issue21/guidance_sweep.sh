#!/usr/bin/env bash
# The text reference pipeline's guidance, chosen on training-template prompts with seed 1 (the tables use
# seed 0 and also the held-out templates): N = 200, DDIM 100, eta 0, full precision on torch.
#   bash docs/issue21/guidance_sweep.sh MODEL_DIR OUT_DIR
set -euo pipefail
model=$1 out=$2
mkdir -p "$out"
prompts=$(mktemp)
python -c "from tools.reference.prompts import prompts_for; print('\n'.join(prompts_for('train', 80)[0]))" > "$prompts"
for g in 1 1.5 2 3 4; do
  dqc sample "$model" --prompts-file "$prompts" -n 200 --steps 100 --eta 0 --guidance "$g" --seed 1 \
    --batch-size 200 -o "$out/g$g.npz" -q
  dqc eval "$out/g$g.npz" --json "$out/g$g.json" | sed -n 2,3p | sed "s/^/guidance $g: /"
done
rm -f "$prompts"

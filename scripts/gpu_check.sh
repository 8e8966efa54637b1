#!/usr/bin/env bash
# GPU acceptance check for the day a GPU machine is lent (no internet needed), in one short run:
#   1. the device tests (tests/test_devices.py: the CUDA tests run where a GPU is present),
#   2. the step benchmark on the device: MoLA vs PEFT LoRA vs the per-expert loop, on SmolLM2 and on a
#      randomly initialised model with LLaMA-2-7B's shapes with the paper's allocation 2468 at budget 160,
#   3. a two-trial Ray study with --gpus-per-trial 0.5 (two trials share one GPU) on SmolLM2, on a small
#      generated classification task (the machine has no task data); no pruner, so both trials must finish,
#   4. one summary table: the step ratios to the frozen base's floor (MoLA, PEFT LoRA) on both models, the
#      peak GPU memory (and RSS) of each of the two trials sharing one GPU (--gpus-per-trial 0.5).
# `--cpu` runs the same steps end to end with tiny models on the CPU; CI runs it that way so it cannot rot.
# Results are written under $OUT (default: a new temporary folder).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
MODE=gpu
if [ "${1:-}" = "--cpu" ]; then MODE=cpu; elif [ -n "${1:-}" ]; then echo "usage: $0 [--cpu]" >&2; exit 2; fi
OUT="${OUT:-$(mktemp -d)}"
mkdir -p "$OUT"
start=$(date +%s)
if [ "$MODE" = gpu ]; then
  "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" \
    || { echo "gpu_check: no CUDA GPU visible; run with --cpu for the CPU dry run" >&2; exit 2; }
  DEVICE=cuda; SMALL=""; BIG="--model llama2-7b-shape --shape 2468 --budget 160"; STUDY_MODEL=smollm2-135m-instruct
  GPUS=0.5; BATCH="--batch 16 --seq 128"; TRAIN=64
else
  DEVICE=cpu; SMALL="--model tiny-llama"; BIG="--model tiny-llama-L8 --shape 2468 --budget 40"
  STUDY_MODEL=tiny-llama-L4; GPUS=0; BATCH="--batch 4 --seq 32 --threads 1"; TRAIN=16
fi
echo "== gpu_check ($MODE) -> $OUT"

echo "== 1. device tests"
"$PY" -m pytest -q -p no:cacheprovider tests/test_devices.py 2>&1 | tail -n 1 | tee "$OUT/tests.txt"

echo "== 2. step benchmark"
# shellcheck disable=SC2086
"$PY" benchmarks/bench_step.py --device "$DEVICE" $SMALL $BATCH --repeats 2 --flops --json "$OUT/bench_small.json"
# shellcheck disable=SC2086
"$PY" benchmarks/bench_step.py --device "$DEVICE" $BIG $BATCH --repeats 2 --flops --json "$OUT/bench_big.json"

echo "== 3. two trials sharing a device (--gpus-per-trial $GPUS)"
"$PY" - "$OUT/task" "$TRAIN" <<'PYTASK'
import json, random, sys
from pathlib import Path
folder, n = Path(sys.argv[1]), int(sys.argv[2])
folder.mkdir(parents=True, exist_ok=True)
rng = random.Random(0)
for split, size in (("train", n), ("validation", 32), ("test", 32)):
    rows = [{"number": k, "label": int(k % 2 == 0)} for k in (rng.randrange(1000) for _ in range(size))]
    (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
(folder / "task.yaml").write_text(
    "name: parity\nfiles: {train: train.jsonl, validation: validation.jsonl, test: test.jsonl}\n"
    "template: \"Is {number} an even number?\\nAnswer:\"\nlabel_field: label\nlabel_words: [\" no\", \" yes\"]\n")
PYTASK
STUDY_ARGS=(--task "custom:$OUT/task/task.yaml" --model "$STUDY_MODEL" --executor ray --trials 2 --max-concurrent 2
            --no-pilot --pruner none --finalist-seeds 0 --max-train-examples "$TRAIN" --max-eval-examples 32 --batch-size 8
            --micro-batch-size 8 --cutoff-len 64 --out "$OUT/study")
if [ "$MODE" = gpu ]; then
  STUDY_ARGS+=(--gpus-per-trial "$GPUS" --cpus-per-trial 1)
else
  STUDY_ARGS+=(--cpus-per-trial 1)
fi
"$PY" -m mola_search.cli.search "${STUDY_ARGS[@]}" > "$OUT/study.log" 2>&1 \
  || { tail -n 20 "$OUT/study.log"; echo "gpu_check: the study failed" >&2; exit 1; }

echo "== 4. summary"
"$PY" - "$OUT" "$MODE" "$(( $(date +%s) - start ))" <<'PYSUM'
import csv, json, sys
from pathlib import Path
out, mode, wall = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
print(f"| check ({mode}) | result |\n|---|---|")
print(f"| device tests | {(out / 'tests.txt').read_text().strip()} |")
for name in ("bench_small", "bench_big"):
    b = json.loads((out / f"{name}.json").read_text())
    cells = ", ".join(f"{k} {v['step_s']:.3f} s" + (f" ({v['peak_gpu_memory_mb']:.0f} MB)" if "peak_gpu_memory_mb" in v else "")
                      for k, v in b["results"].items())
    ratios = ", ".join(f"{k}={v:.2f}" for k, v in b["ratios"].items())
    ratios += "; FLOPs x floor: " + ", ".join(f"{k} {v / b['flops']['floor']:.3f}" for k, v in b["flops"].items())
    print(f"| step, {b['args']['model'] or 'smollm2'} ({b['layers']} layers, {sum(b['allocation'])} experts) on "
          f"{b['device']} | {cells}; {ratios} |")
rows = list(csv.DictReader((out / "study" / "trials.csv").open()))
states = ", ".join(f"#{r['number']} {r['state']} {r['score'] or r['failure'][:60]} on {r['node'][:8]}" for r in rows)
print(f"| two-trial study | {states} |")
memory = ", ".join(f"#{r['number']} {float(r['peak_gpu_mb'] or 0) / 1024:.2f} GB GPU, "
                   f"{float(r['peak_rss_mb'] or 0) / 1024:.2f} GB RSS" for r in rows)
print(f"| peak memory per trial (two sharing one device) | {memory} |")
print(f"| wall time | {wall} s |")
ok = len(rows) == 2 and all(r["state"] == "COMPLETE" for r in rows)
sys.exit(0 if ok else 1)
PYSUM

#!/usr/bin/env bash
# The evaluate and export stages of the `sam3` preset on one GPU, before and after, in one call:
# fetch (random init), prepare and one epoch of stock training (the checkpoint both read), then
# evaluate and export with this checkout's code and with OLD_SRC's (the code before, e.g. a
# `git archive` of an earlier commit's src/ and configs/, side by side), each timed as a whole stage. base.threads 16 as in the
# issue's 184 s export figure. Writes $OUT/export_eval.json (stage seconds, parity, whether the
# two evaluates' predictions agree) and each stage's log.
#
# On the GPU machine, repository root, .whl/ carried (bench/gpu_sam3_train.md):
#   OLD_SRC=.gpu/old/src bash bench/gpu_export_eval.sh
# OLD_STAGES (default "evaluate export") names the stages run with the old code too, NEW_STAGES
# (default "export") the new code's after evaluate; PROFILE="evaluate ..." runs those under cProfile.
set -euo pipefail
OLD_SRC=${OLD_SRC:?a src/ folder with the code before}
RUN=${RUN:-/tmp/sam3-run}
source bench/gpu_env.sh
mkdir -p "$RUN"
python3 - "$RUN" "${PRESET:-sam3}" <<'PY'
import sys, yaml
run, preset = sys.argv[1:]
p = yaml.safe_load(open("params.yaml"))
p["paths"].update({k: f"{run}/{k}" for k in ("base", "prepared", "train", "baseline", "scratch")})
p["model"]["preset"] = preset
if preset == "sam3":  # PRESET=tiny: the shipped CPU settings, a dry run of this script anywhere
    p["base"]["threads"] = 16
    p["trainer"].update(num_gpus=1, resolution=1008, resize_min=480, max_epochs=1, batch_size=1, amp=True, num_workers=2)
for code in ("new", "old"):
    p["paths"].update(eval=f"{run}/eval-{code}", export=f"{run}/export-{code}")
    if code == "old":  # keys newer than the code before, which its strict params would refuse
        p["evaluate"].pop("batch_size", None)
    yaml.safe_dump(p, open(f"{run}/params-{code}.yaml", "w"), sort_keys=False)
PY
since() {  # since START: seconds from START (date +%s.%N) to now, one decimal
  python3 -c "print(round($(date +%s.%N) - $1, 1))"
}
stage() {  # stage CODE NAME: run one stage with that code, its wall time to $OUT/times.txt
  local src=$PWD/src
  [ "$1" = old ] && src=$OLD_SRC
  local start=$(date +%s.%N)
  local profile=()  # PROFILE=evaluate: that stage under cProfile, the stats to $OUT/<stage>-<code>.prof
  [[ " ${PROFILE:-} " == *" $2 "* ]] && profile=(-m cProfile -o "$OUT/$2-$1.prof")
  PYTHONPATH="$src:$SITE" timeout "${LIMIT:-0}" python3 "${profile[@]}" -m "sam3ft.stages.$2" --params "$RUN/params-$1.yaml" \
    >"$OUT/$2-$1.log" 2>&1 \
    || { tail -30 "$OUT/$2-$1.log"; echo "$2-$1 failed" | tee -a "$OUT/times.txt"; return 0; }
  echo "$2-$1 $(since "$start")" | tee -a "$OUT/times.txt"
}
stage new fetch
stage new prepare
stage new train
ls -la "$RUN/train" | tee -a "$OUT/device.txt" || true
stage new evaluate
for name in ${NEW_STAGES-export}; do stage new "$name"; done  # NEW_STAGES="": evaluate alone
for name in ${OLD_STAGES-evaluate export}; do  # OLD_STAGES=evaluate: the export code did not change
  LIMIT=${OLD_EXPORT_LIMIT:-400} stage old "$name"  # the old export's CPU parity check: minutes
done
# what every stage pays before its own work: Python with torch and sam3 imported, then CUDA started
# (bytecode cached by then: gpu_env.sh keeps it in /tmp/pycache)
probe() {  # probe NAME CODE: a fresh python3 running CODE, its wall time to $OUT/times.txt
  local start=$(date +%s.%N)
  python3 -c "$2" || { echo "$1 failed" | tee -a "$OUT/times.txt"; return 0; }
  echo "$1 $(since "$start")" | tee -a "$OUT/times.txt"
}
probe imports "import sam3ft.stages.evaluate"
probe imports+cuda "import sam3ft.stages.evaluate, torch; torch.zeros(1, device='cuda')"
python3 - "$RUN" "$OUT" <<'PY'
import json, sys
from pathlib import Path
run, out = Path(sys.argv[1]), Path(sys.argv[2])
times = dict(line.rsplit(" ", 1) for line in (out / "times.txt").read_text().splitlines() if line.count(" ") >= 1 and line.split()[-1].replace(".", "").isdigit())
summary = {"seconds": {k: float(v) for k, v in times.items()}}
for code in ("new", "old"):
    parity = run / f"export-{code}" / "parity.json"
    if parity.is_file():
        summary[f"parity_{code}"] = json.loads(parity.read_text())
agree = {}
for split in ("valid", "test"):
    new, old = (run / f"eval-{c}" / "predictions" / f"{split}.json" for c in ("new", "old"))
    if new.is_file() and old.is_file():
        a, b = json.loads(new.read_text()), json.loads(old.read_text())
        same_masks = sum(x.get("segmentation") == y.get("segmentation") for x, y in zip(a, b))
        box = max((abs(u - v) for x, y in zip(a, b) for u, v in zip(x["bbox"], y["bbox"])), default=0.0)
        score = max((abs(x["score"] - y["score"]) for x, y in zip(a, b)), default=0.0)
        agree[split] = {"records": [len(a), len(b)], "identical_masks": same_masks, "max_bbox_diff": box, "max_score_diff": score}
summary["predictions_new_vs_old"] = agree
for code in ("new", "old"):
    metrics = run / f"eval-{code}" / "metrics.json"
    if metrics.is_file():
        m = json.loads(metrics.read_text())
        summary[f"valid_{code}"] = {k: m["valid"].get(k) for k in ("AP", "AP50")} | {"segm_AP": m["valid"].get("segm", {}).get("AP")}
(out / "export_eval.json").write_text(json.dumps(summary, indent=2) + "\n")
print(json.dumps(summary, indent=2))
PY

"""Does the tiny CPU demo learn? One train-stage run with params overrides, summarised per epoch.

    PYTHONPATH=src python bench/demo_learns.py TAG [-S section.key=value ...]

Runs `python -m sam3ft.stages.train` on a copy of params.yaml with the overrides, its outputs and
scratch under /tmp/demo_learns/TAG (the worktree's artifacts are untouched; fetch and prepare must
have run). Prints, per epoch: the train loss, its weighted parts (box L1, GIoU, classification,
presence; one-to-one vs one-to-many queries; scaled to sum to the loss) and the validation AP50;
writes the same to bench/results/demo_learns/TAG.json. Validation uses the valid split only, never test.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "demo_learns"
WEIGHTS = {"bbox": 5.0, "giou": 2.0, "ce": 20.0, "presence": 20.0}  # configs/train/sam3ft.yaml


def part(name: str) -> tuple[str, float] | None:
    """The group ('ce', 'ce_o2m', ...) and weight of one logged loss term, None for a non-loss
    (one-to-many terms are logged already scaled by the loss's o2m_weight)."""
    for kind, weight in WEIGHTS.items():
        if name.startswith(f"loss_{kind}") or name.startswith(f"{kind}_loss"):
            return kind + ("_o2m" if name.endswith("_o2m") else ""), weight
    return None


def summarise(scratch: Path) -> list[dict[str, float]]:
    """Per epoch: mean train loss, mean weighted loss parts, validation AP50 (where validated)."""
    logs = scratch / "logs"
    train = [json.loads(line) for line in (logs / "train_stats.json").read_text().splitlines()]
    val = {
        int(s["Trainer/epoch"]): s["Meters_train/val_valid/detection/coco_eval_bbox_AP_50"]
        for s in map(json.loads, (logs / "val_stats.json").read_text().splitlines())
    }
    steps: dict[int, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    totals: dict[int, float] = {}
    for line in (logs / "steps.jsonl").read_text().splitlines():
        row = json.loads(line)
        named = part(row["name"])
        if named:
            steps[row["step"]][named[0]] += row["value"] * named[1]
        elif row["name"] == "loss":
            totals[row["step"]] = row["value"]
    for step, parts in steps.items():  # the step's loss is a constant times their sum (batch scaling)
        scale = totals[step] / sum(parts.values())
        steps[step] = defaultdict(float, {k: v * scale for k, v in parts.items()})
    per_epoch = len(steps) // len(train)
    rows = []
    for stats in train:
        epoch = int(stats["Trainer/epoch"])
        mine = [steps[s] for s in range(epoch * per_epoch, (epoch + 1) * per_epoch)]
        parts = {k: round(sum(m.get(k, 0.0) for m in mine) / len(mine), 2) for k in sorted(mine[0])}
        rows.append(
            {
                "epoch": epoch,
                "loss": round(stats["Losses/train_all_loss"], 2),
                **parts,
                "AP50": val.get(epoch),
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("tag")
    parser.add_argument("-S", "--set", action="append", default=[], help="section.key=value (YAML value)")
    args = parser.parse_args()
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    for item in args.set:
        key, value = item.split("=", 1)
        section, name = key.split(".", 1)
        params[section][name] = yaml.safe_load(value)
    run_dir = Path("/tmp/demo_learns") / args.tag
    params["paths"]["train"] = str(run_dir / "train")
    params["paths"]["scratch"] = str(run_dir / "scratch")
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    start = time.perf_counter()
    cmd = [sys.executable, "-m", "sam3ft.stages.train", "--params", str(run_dir / "params.yaml")]
    subprocess.run(cmd, cwd=ROOT, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    seconds = time.perf_counter() - start
    rows = summarise(run_dir / "scratch" / "train")
    selection = json.loads((run_dir / "train" / "run" / "selection.json").read_text())
    for row in rows:
        print(" ".join(f"{k}={v}" for k, v in row.items()))
    print(f"selected epoch {selection['epoch']} {selection['metric']}={selection['value']}; {seconds:.0f} s")
    RESULTS.mkdir(parents=True, exist_ok=True)
    record = {"overrides": args.set, "seconds": round(seconds, 1), "selection": selection, "epochs": rows}
    (RESULTS / f"{args.tag}.json").write_text(json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
    main()

"""File names inside the stage directories (the directories themselves are params.yaml `paths`)."""

MANIFEST = "manifest.json"  # fetch: what the base model is
SPEC_FILE = "model_spec.yaml"  # fetch: the resolved ModelSpec
VOCAB_NAME = "bpe_simple_vocab_16e6.txt.gz"  # fetch/export: text tokenizer vocabulary
ANNOTATIONS_FILE = "_annotations.coco.json"  # Roboflow's and sam3's per-split COCO file
METRICS_FILE = "metrics.json"  # baseline/evaluate: metrics per split
SUMMARY_FILE = "summary.json"  # evaluate: the decision metrics (the DVC metrics file), metrics/summary.py
BASE_BLOCK = "base"  # evaluate: the key of metrics.json holding the base model's metrics (baseline's)
CHECKPOINT = "checkpoint.pt"  # train: sam3 trainer checkpoint
SELECTION = "run/selection.json"  # train: which epoch the checkpoint holds, and why
MODEL_DIR = "model"  # export: the shipped model's folder inside paths.export
MODEL_JSON = "model.json"  # export: how to rebuild the model

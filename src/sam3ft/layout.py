"""File names inside the stage directories (the directories themselves are params.yaml `paths`),
and the checkout's own folders."""

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]  # the checkout this package runs from (src/sam3ft/)
CONFIGS_DIR = REPO_ROOT / "configs"  # model/ presets, recipes/, train/ (the trainer's hydra configs)

DEFAULT_PARAMS = Path("params.yaml")  # relative: a checkout's root is where commands run
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


def is_checkout(folder: Path) -> bool:
    """A sam3ft checkout's root: dvc.yaml and params.yaml side by side."""
    return (folder / "dvc.yaml").is_file() and (folder / "params.yaml").is_file()


def checkout_root(start: Path) -> Path | None:
    """The nearest folder at or above `start` that is a checkout's root."""
    return next((root for root in [start, *start.parents] if is_checkout(root)), None)

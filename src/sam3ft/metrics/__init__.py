"""Detection metrics (pycocotools)."""

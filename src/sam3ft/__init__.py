"""sam3ft: fine-tune Meta's SAM3 on a small custom dataset, reproducibly (DVC around sam3's trainer)."""

__version__ = "0.1.0"

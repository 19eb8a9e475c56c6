"""Driving sam3's Trainer: config composition, CPU workarounds, the run itself."""

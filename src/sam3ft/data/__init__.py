"""Reading, validating and writing COCO datasets (Roboflow exports in, sam3's layout out)."""

"""Getting files from where teams keep them: the Hugging Face hub, S3, local paths."""

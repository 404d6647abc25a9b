"""The job layer: the driver that runs a job's stages, its report, W&B tracking and the CLI."""

"""Configs as code, one file per job (`--config=experiments/configs/<job>.py[:<name>]`)."""

"""Configuration: reading recipe files (``yaml_io``) and, for training, the typed config."""

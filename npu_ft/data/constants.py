"""Constants shared by the data modules."""

#: Label value that the loss ignores (``torch.nn.CrossEntropyLoss(ignore_index=-100)``), as in LLaMA-Factory.
IGNORE_INDEX = -100

#: Name of the dataset registry file inside ``dataset_dir``.
DATA_CONFIG = "dataset_info.json"

#: File extension -> reader kind, as LLaMA-Factory maps them (only json/jsonl are read offline here).
FILEEXT2TYPE = {"arrow": "arrow", "csv": "csv", "json": "json", "jsonl": "json", "parquet": "parquet", "txt": "text"}

"""``DataArguments``: the data keys of a LLaMA-Factory recipe (declared once, in :mod:`npu_ft.config`)."""

from npu_ft.config.data_args import DataArguments

__all__ = ["DataArguments"]

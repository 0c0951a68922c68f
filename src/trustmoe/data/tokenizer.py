"""Byte-level BPE tokenizer (the `tokenizers` library), saved as `tokenizer.json`, and
`TextCodec`, the one way text becomes token ids everywhere (completions, chat, eval, generate).

Byte-level pre-tokenization with no prefix space and a byte-level decoder makes
`decode(encode(text)) == text` for every UTF-8 string. Special tokens come first so their ids
are stable across vocabulary sizes: `<|endoftext|>` separates documents and is our models'
BOS/EOS; `<|im_start|>`/`<|im_end|>` frame chat turns.

    codec = TextCodec.from_dir("runs/demo/model")   # BOS from config.json, else the tokenizer's
    codec.encode("def f(x):", add_bos=True)         # [bos, ...]: what every prompt path sends
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from trustmoe.io import TrustmoeError, atomic_write_json, atomic_write_text

EOS_TOKEN = "<|endoftext|>"
SPECIAL_TOKENS = [EOS_TOKEN, "<|im_start|>", "<|im_end|>"]
MIN_VOCAB = 256 + len(SPECIAL_TOKENS)  # every byte plus the special tokens
DEFAULT_CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def train_tokenizer(texts: Iterable[str], vocab_size: int, show_progress: bool = False) -> Tokenizer:
    """Train a byte-level BPE tokenizer with exactly `vocab_size` entries (when data allows)."""
    if vocab_size < MIN_VOCAB:
        raise TrustmoeError(f"vocab size must be at least {MIN_VOCAB} (256 bytes + special tokens)")
    if vocab_size > 1 << 20:
        raise TrustmoeError(f"vocab size {vocab_size} is absurd; use at most {1 << 20}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=show_progress,
        min_frequency=2,
    )
    tok.train_from_iterator(_nonempty(texts), trainer=trainer)
    return tok


def _nonempty(texts: Iterable[str]) -> Iterator[str]:
    for t in texts:
        if t:
            yield t


def load_tokenizer(path: str | Path) -> Tokenizer:
    path = Path(path)
    if path.is_dir():
        path = path / "tokenizer.json"
    if not path.exists():
        raise TrustmoeError(f"tokenizer not found: {path}")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises a bare Exception on bad JSON
        raise TrustmoeError(f"cannot read tokenizer {path}: {e}") from None


def eos_id(tok: Tokenizer) -> int:
    i = tok.token_to_id(EOS_TOKEN)
    if i is None:
        raise TrustmoeError(f"tokenizer has no {EOS_TOKEN} token")
    return i


def save_tokenizer(tok: Tokenizer, out_dir: str | Path) -> Path:
    """Write tokenizer.json and a tokenizer_config.json that transformers understands."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "tokenizer.json", tok.to_str())
    write_tokenizer_config(out)
    return out / "tokenizer.json"


def write_tokenizer_config(out_dir: str | Path) -> None:
    atomic_write_json(Path(out_dir) / "tokenizer_config.json", {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": EOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "pad_token": EOS_TOKEN,
        "unk_token": None,
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 1_000_000,
        "chat_template": DEFAULT_CHAT_TEMPLATE,
    })


# ---------------------------------------------------------------- one encode for text


@dataclass(frozen=True)
class TextCodec:
    """Text <-> ids with the model's BOS, the same on every path.

    `encode(text, add_bos=True)` is the tokenizer's ids *without* its own special tokens, with
    the BOS id in front (unless the text already starts with it, e.g. a chat template that
    renders `{{ bos_token }}`), so a Llama-style tokenizer whose post-processor adds `<s>`
    itself and our byte-level BPE (which adds nothing) give the same ids for the same text.
    The BOS id comes from the model's config (`bos_token_id`), else from the tokenizer
    (`tokenizer_config.json`'s `bos_token`, else its post-processor); a model with no BOS at
    all starts documents with its EOS, as lm-evaluation-harness and GPT-2 do (`prefix_id`).
    """

    tokenizer: Tokenizer
    bos_id: int | None  # the model's BOS, None when neither config nor tokenizer names one
    eos_id: int | None
    adds_bos: bool  # the tokenizer's own post-processor inserts a BOS (Llama style)

    @classmethod
    def create(cls, tokenizer: Tokenizer, *, bos_id: int | None = None,
               eos_id: int | None = None, tokenizer_config: dict[str, Any] | None = None
               ) -> TextCodec:
        """`bos_id`/`eos_id` are the model config's (they win); the tokenizer fills gaps."""
        processor_bos = _post_processor_bos(tokenizer)
        tc = tokenizer_config or {}
        if bos_id is None:
            bos_id = _token_id(tokenizer, tc.get("bos_token"))
        if bos_id is None:
            bos_id = processor_bos
        if eos_id is None:
            eos_id = _token_id(tokenizer, tc.get("eos_token"))
        if eos_id is None:
            eos_id = tokenizer.token_to_id(EOS_TOKEN)
        vocab = tokenizer.get_vocab_size(with_added_tokens=True)
        for name, v in (("bos", bos_id), ("eos", eos_id)):
            if v is not None and not 0 <= v < vocab:
                raise TrustmoeError(f"{name}_token_id {v} is outside the vocabulary (size {vocab})")
        return cls(tokenizer, bos_id, eos_id, processor_bos is not None)

    @classmethod
    def from_dir(cls, path: str | Path, *, bos_id: int | None = None,
                 eos_id: int | None = None) -> TextCodec:
        """A model (or tokenizer) directory: tokenizer.json, config.json, tokenizer_config.json."""
        path = Path(path)
        tok = load_tokenizer(path)
        folder = path if path.is_dir() else path.parent
        cfg = _read_optional_json(folder / "config.json")
        if bos_id is None and isinstance(cfg.get("bos_token_id"), int):
            bos_id = cfg["bos_token_id"]
        if eos_id is None:
            e = cfg.get("eos_token_id")
            eos_id = e if isinstance(e, int) else (e[0] if isinstance(e, list) and e else None)
        return cls.create(tok, bos_id=bos_id, eos_id=eos_id,
                          tokenizer_config=_read_optional_json(folder / "tokenizer_config.json"))

    @property
    def prefix_id(self) -> int | None:
        """The token every document and prompt starts after: BOS, else EOS."""
        return self.bos_id if self.bos_id is not None else self.eos_id

    @property
    def vocab_size(self) -> int:
        return int(self.tokenizer.get_vocab_size(with_added_tokens=True))

    def encode(self, text: str, *, add_bos: bool) -> list[int]:
        ids = list(self.tokenizer.encode(text, add_special_tokens=False).ids)
        return self._with_bos(ids) if add_bos else ids

    def encode_batch(self, texts: Sequence[str], *, add_bos: bool) -> list[list[int]]:
        encs = self.tokenizer.encode_batch(list(texts), add_special_tokens=False)
        return [self._with_bos(list(e.ids)) if add_bos else list(e.ids) for e in encs]

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = True) -> str:
        return str(self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens))

    def _with_bos(self, ids: list[int]) -> list[int]:
        p = self.prefix_id
        if p is None or (ids and ids[0] == p):
            return ids
        return [p, *ids]


def _token_id(tok: Tokenizer, token: Any) -> int | None:
    if isinstance(token, dict):  # {"content": "<s>", ...} (AddedToken form)
        token = token.get("content")
    if not isinstance(token, str) or not token:
        return None
    i = tok.token_to_id(token)
    return int(i) if i is not None else None


def _post_processor_bos(tok: Tokenizer) -> int | None:
    """The id a tokenizer's post-processor puts in front of every text, if any."""
    plain = tok.encode("a", add_special_tokens=False).ids
    full = tok.encode("a", add_special_tokens=True).ids
    if len(full) > len(plain) and full[1:1 + len(plain)] == plain:
        return int(full[0])
    return None


def _read_optional_json(path: Path) -> dict[str, Any]:
    if not path.exists():
        return {}
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TrustmoeError(f"{path} is not valid JSON: {e}") from None
    return obj if isinstance(obj, dict) else {}

"""Byte-level BPE tokenizer (the `tokenizers` library), saved as `tokenizer.json`.

Byte-level pre-tokenization with no prefix space and a byte-level decoder makes
`decode(encode(text)) == text` for every UTF-8 string. Special tokens come first so their ids
are stable across vocabulary sizes: `<|endoftext|>` = 0 separates documents and is the model's
BOS/EOS; `<|im_start|>`/`<|im_end|>` frame chat turns.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path

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

"""The guard's classifier: a linear model over hashed character and word n-grams.

Features (all hashed into 2**bits buckets with multiply-shift hashing of a polynomial hash,
computed for the whole text at once in numpy, no Python loop per n-gram):

- character n-grams, n in `char_ns`, of the normalized text;
- words and word bigrams.

A text's feature vector is its bucket counts divided by sqrt(number of n-grams), so the
score of any window of a long text is two prefix-sum lookups: a prompt of megabytes is
scored window by window (`window` characters, half-overlapping) in one pass, and the
request's score is the highest window's. A short text is one window, and its score is
exactly scikit-learn's `decision_function` on the same features (tested).

Saved as `guard.safetensors` (`weight` float32 (2**bits,), `bias` float32 (1,)) plus
`guard.json` (feature settings, threshold at 1% FPR, training summary); never pickle.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from trustmoe.io import TrustmoeError, atomic_write_json, read_json

WEIGHTS_FILE = "guard.safetensors"
CONFIG_FILE = "guard.json"
FORMAT = "trustmoe-guard-linear/1"
_B = np.uint64(0x100000001B3)  # odd: invertible mod 2**64
_MIX = np.uint64(0x9E3779B97F4A7C15)
_WORD_TAG = np.uint64(0xA24BAED4963EE407)
_BIGRAM = np.uint64(0x9FB21C651E98DF25)
_MAXLEN = 32  # words longer than this are hashed by their first 32 characters


@dataclass(frozen=True)
class FeatureConfig:
    bits: int = 18
    char_ns: tuple[int, ...] = (3, 4, 5)
    words: bool = True
    window: int = 2048  # characters per scored window (~512 tokens)

    def validate(self) -> None:
        if not 8 <= self.bits <= 24:
            raise TrustmoeError(f"guard classifier: bits must be in [8, 24], got {self.bits}")
        if not self.char_ns or any(not 1 <= n <= 8 for n in self.char_ns):
            raise TrustmoeError("guard classifier: char_ns must be n-gram sizes in [1, 8]")
        if self.window < 64:
            raise TrustmoeError("guard classifier: window must be at least 64 characters")


def _pow_tables(n: int) -> tuple[np.ndarray, np.ndarray]:
    """B**i and B**-i mod 2**64 for i < n (uint64 arithmetic wraps)."""
    inv = np.uint64(pow(int(_B), -1, 1 << 64))
    fwd = np.empty(n, dtype=np.uint64)
    bwd = np.empty(n, dtype=np.uint64)
    if n:
        fwd[0] = bwd[0] = np.uint64(1)
        fwd[1:] = _B
        bwd[1:] = inv
        fwd = np.cumprod(fwd)
        bwd = np.cumprod(bwd)
    return fwd, bwd


class Featurizer:
    """text -> (bucket index, position) of every n-gram, in one vectorised pass."""

    def __init__(self, cfg: FeatureConfig) -> None:
        cfg.validate()
        self.cfg = cfg
        self.shift = np.uint64(64 - cfg.bits)
        self._fwd, self._bwd = _pow_tables(cfg.window * 2 + 64)

    def _tables(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        if n > len(self._fwd):
            self._fwd, self._bwd = _pow_tables(max(n, 2 * len(self._fwd)))
        return self._fwd[:n], self._bwd[:n]

    def features(self, text: str) -> tuple[np.ndarray, np.ndarray]:
        """(buckets int64 (F,), positions int64 (F,)) for the normalized `text`."""
        buckets, positions = self.pieces(text, with_positions=True)
        if not buckets:
            return np.empty(0, np.int64), np.empty(0, np.int64)
        return np.concatenate(buckets), np.concatenate(positions)

    def pieces(self, text: str, with_positions: bool = False
               ) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """The buckets of each n-gram family (char n for each n, words, word bigrams), and
        with `with_positions` where each n-gram starts; `features` concatenates them."""
        codes = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
        L = len(codes)
        fwd, bwd = self._tables(L + 1)
        buckets: list[np.ndarray] = []
        positions: list[np.ndarray] = []
        with np.errstate(over="ignore"):
            c = codes.astype(np.uint64) + np.uint64(1)  # (L,)
            q = np.zeros(L + 1, dtype=np.uint64)
            np.cumsum(c * fwd[:L], out=q[1:])  # q[k] = sum_{t<k} c[t] B^t
            for n in self.cfg.char_ns:
                if n > L:
                    continue
                h = (q[n:] - q[:-n]) * bwd[: L - n + 1]  # hash of text[i:i+n], (L-n+1,)
                buckets.append(self._bucket(h ^ (np.uint64(n) * _MIX)))
                if with_positions:
                    positions.append(np.arange(L - n + 1, dtype=np.int64))
            if self.cfg.words and L:
                wb, wp = self._words(codes, q, bwd)
                buckets += wb
                positions += wp if with_positions else []
        return buckets, positions

    def _words(self, codes: np.ndarray, q: np.ndarray, bwd: np.ndarray
               ) -> tuple[list[np.ndarray], list[np.ndarray]]:
        alnum = _is_word_char(codes)  # (L,) bool
        edges = np.diff(alnum, prepend=False, append=False).nonzero()[0]  # starts, ends alternate
        if not len(edges):
            return [], []
        starts = edges[0::2]
        ends = np.minimum(edges[1::2], starts + _MAXLEN)
        h = (q[ends] - q[starts]) * bwd[starts] ^ _WORD_TAG  # (W,)
        out_b = [self._bucket(h)]
        out_p = [starts.astype(np.int64)]
        if len(h) > 1:
            out_b.append(self._bucket(h[:-1] * _BIGRAM + h[1:]))
            out_p.append(starts[:-1].astype(np.int64))
        return out_b, out_p

    def _bucket(self, h: np.ndarray) -> np.ndarray:
        return ((h * _MIX) >> self.shift).astype(np.int64)

    def vector(self, text: str) -> tuple[np.ndarray, np.ndarray]:
        """Sparse feature vector of `text` as one window: (indices, values)."""
        b, _ = self.features(text)
        if not len(b):
            return np.empty(0, np.int64), np.empty(0, np.float64)
        idx, counts = np.unique(b, return_counts=True)
        return idx, counts / np.sqrt(len(b))


_WORD_CHARS = np.zeros(256, dtype=bool)  # [0-9A-Za-z_] and every code point from U+00C0 on
for _a, _b in ((48, 57), (65, 90), (95, 95), (97, 122), (0xC0, 0xFF)):
    _WORD_CHARS[_a: _b + 1] = True


def _is_word_char(codes: np.ndarray) -> np.ndarray:
    return _WORD_CHARS[np.minimum(codes, 255)]  # (L,) bool; codes above 255 land on True


@dataclass
class GuardClassifier:
    """Linear model: score(window) = sigmoid(w . x + b); the text's score is its worst window."""

    cfg: FeatureConfig
    weight: np.ndarray  # float32 (2**bits,)
    bias: float
    threshold: float = 0.5  # probability at which the held-out benign FPR is 1%
    info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.feat = Featurizer(self.cfg)
        if self.weight.shape != (1 << self.cfg.bits,):
            raise TrustmoeError(f"guard classifier weight has shape {self.weight.shape}, "
                                f"expected ({1 << self.cfg.bits},)")
        self.weight = np.ascontiguousarray(self.weight, dtype=np.float32)

    def logit(self, text: str) -> float:
        """The highest window logit of normalized `text` (long texts in blocks of 16 windows,
        so memory and hash tables stay bounded)."""
        W, L = self.cfg.window, len(text)
        if L <= W:  # one window: sum the weights of each n-gram family, no positions needed
            parts, _ = self.feat.pieces(text)
            count = sum(len(p) for p in parts)
            if not count:
                return self.bias
            total = sum(float(self.weight[p].sum(dtype=np.float64)) for p in parts)
            return total / float(np.sqrt(count)) + self.bias
        block = 16 * W
        best = -np.inf
        for s in range(0, L, block):
            chunk = text[s: s + block + W]
            last = s + block >= L
            best = max(best, self._windows(chunk, len(chunk) - W // 2 if last else block))
            if last:
                break
        return best + self.bias

    def _windows(self, chunk: str, limit: int) -> float:
        """Highest window sum/sqrt(count) over windows of `chunk` starting before `limit`."""
        b, pos = self.feat.features(chunk)
        W, L = self.cfg.window, len(chunk)
        w = self.weight[b].astype(np.float64)  # (F,)
        # per-position sums, then prefix sums: any window's score is two lookups
        cs = np.concatenate(([0.0], np.cumsum(np.bincount(pos, weights=w, minlength=L))))
        cn = np.concatenate(([0], np.cumsum(np.bincount(pos, minlength=L))))
        starts = np.arange(0, max(limit, 1), W // 2)  # half-overlapping windows
        ends = np.minimum(starts + W, L)
        n = np.maximum(cn[ends] - cn[starts], 1)
        return float(np.max((cs[ends] - cs[starts]) / np.sqrt(n)))

    def score(self, text: str) -> float:
        """Probability that normalized `text` is an attack (its worst window)."""
        return float(1.0 / (1.0 + np.exp(-np.clip(self.logit(text), -50, 50))))

    # ------------------------------------------------------------ files

    def save(self, out_dir: str | Path) -> None:
        from safetensors.numpy import save_file

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        save_file({"weight": self.weight, "bias": np.array([self.bias], dtype=np.float32)},
                  str(out / WEIGHTS_FILE), metadata={"format": FORMAT})
        atomic_write_json(out / CONFIG_FILE, {
            "format": FORMAT, "features": {**asdict(self.cfg), "char_ns": list(self.cfg.char_ns)},
            "threshold": self.threshold, "info": self.info})

    @classmethod
    def load(cls, model_dir: str | Path) -> GuardClassifier:
        """Load a guard model dir (integrity manifest checked; safetensors only)."""
        from safetensors.numpy import load_file

        from trustmoe.security.integrity import check_on_load

        d = Path(model_dir)
        if not (d / CONFIG_FILE).is_file():
            raise TrustmoeError(f"{d} is not a guard model directory (no {CONFIG_FILE})")
        check_on_load(d, "guard model")
        meta = read_json(d / CONFIG_FILE, "guard model config")
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise TrustmoeError(f"{d / CONFIG_FILE}: not a {FORMAT} file")
        try:
            f = meta["features"]
            cfg = FeatureConfig(bits=int(f["bits"]), char_ns=tuple(int(n) for n in f["char_ns"]),
                                words=bool(f["words"]), window=int(f["window"]))
            threshold = float(meta["threshold"])
        except (KeyError, TypeError, ValueError) as e:
            raise TrustmoeError(f"{d / CONFIG_FILE}: bad or missing field ({e})") from None
        from trustmoe.security.safetensors_check import check_file

        check_file(d / WEIGHTS_FILE, expected={"weight": ((1 << cfg.bits,), "F32"),
                                               "bias": ((1,), "F32")})
        try:
            t = load_file(str(d / WEIGHTS_FILE))
        except Exception as e:  # safetensors raises several types; the header was checked already
            raise TrustmoeError(f"cannot read {d / WEIGHTS_FILE}: {e}") from None
        return cls(cfg, t["weight"], float(t["bias"][0]), threshold, meta.get("info", {}))


def load_info(model_dir: str | Path) -> dict[str, Any]:
    meta = json.loads((Path(model_dir) / CONFIG_FILE).read_text())
    return dict(meta.get("info", {}))

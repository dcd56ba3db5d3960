import numpy as np
import torch


class TokenWindows:
    """Non-overlapping windows of seq_len + 1 tokens over a flat token array (index i is taken mod len):
    sample i is tokens[i*S : i*S + S + 1] (inputs are the first S, targets the last S)."""

    def __init__(self, tokens: np.ndarray, seq_len: int):
        self.tokens = tokens
        self.seq_len = seq_len
        self.num_samples = (len(tokens) - 1) // seq_len

    def __len__(self) -> int:
        return self.num_samples

    def batch(self, indices) -> tuple[torch.Tensor, torch.Tensor]:
        s, n = self.seq_len, self.num_samples
        # sampler indices carry their epoch (e * num_samples + i): a plain dataset repeats itself
        rows = np.stack([np.asarray(self.tokens[(i % n) * s : (i % n) * s + s + 1], dtype=np.int64) for i in indices])
        t = torch.from_numpy(rows)
        return t[:, :-1], t[:, 1:]

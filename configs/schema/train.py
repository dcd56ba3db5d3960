from dataclasses import dataclass
from typing import Any


@dataclass
class TrainConfig:
    max_steps: int = 300
    seq_len: int = 256
    global_batch_size: int = 16  # sequences per optimizer step, over all data-parallel ranks
    micro_batch_size: int = 8  # sequences per forward on one rank (the rest is grad accumulation)
    eval_every: int = 50
    eval_batches: int = 8
    seed: int = 1234
    device: str = "auto"  # auto | cpu | cuda
    precision: str = "auto"  # auto (bf16 autocast on GPU, fp32 on CPU) | bf16 | fp32
    # torch.compile each block: true | false | auto (on for CUDA where it is known to work; the trainer says
    # why when auto leaves it off, train/auto_defaults.py). Typed Any: validate.py checks the value.
    compile: Any = "auto"
    deterministic: bool = False  # torch deterministic algorithms (slower on GPU)
    max_skipped_steps: int = 5  # optimizer steps skipped in a row (NaN/Inf loss or grad norm) before the run stops
    init_from: str = ""  # start from these weights: a sparsetron checkpoint dir or an HF Llama folder

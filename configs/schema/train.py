from dataclasses import dataclass


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
    compile: bool = False  # torch.compile each block
    deterministic: bool = False  # torch deterministic algorithms (slower on GPU)
    init_from: str = ""  # start from these weights: a sparsetron checkpoint dir or an HF Llama folder

"""The training loop: one process or many (torchrun), CPU or GPU, resumable to the step."""

import os
import signal
import sys
import time
import traceback
from typing import Dict, List, Optional

import torch
from omegaconf import OmegaConf

from sparsetron.configs.schema.validate import validate
from sparsetron.parallel.comm_timer import StepCommTimer
from sparsetron.parallel.engine import build_engine
from sparsetron.parallel.runtime import Runtime, init_runtime, shutdown

from . import auto_defaults
from . import checkpoint as ckpt
from .data import Data, ResumableSampler, build_data
from .loader import Prefetcher
from .metrics import (MetricsSink, flops_per_token, parameter_counts, peak_flops, peak_memory_gib, plot_losses,
                      routing_metrics)
from .model import Llama
from .optim import lr_at
from .pretrained import adopt_hf_model_config, load_pretrained
from .profiling import StepProfiler
from .resilience import (REQUEUE_EXIT_CODE, NonFiniteError, PreemptionHandler, SkipCounter, Watchdog,
                         defer_preemption_signals, enable_stack_dumps, inject_nan, nan_fault_steps,
                         note_exit_status)
from .run_dir import RunDirError, claim as claim_run_dir, release as release_run_dir


def init_device(cfg, device: torch.device, n_params: int) -> torch.device:
    """Where the full model is built before the engine places or shards it. On the GPU when its fp32
    weights take under half of the free GPU memory: a host-side init of a multi-billion model is slow
    and puts a full copy per rank in host memory. On the CPU otherwise -- a model bigger than one GPU
    (TP/PP shard it after) -- and always under ZeRO-3 or offload, which exist for that case."""
    if device.type != "cuda":
        return torch.device("cpu")
    p = cfg.parallel
    if p.zero_stage == 3 or p.offload_param != "none" or p.offload_optimizer != "none":
        return torch.device("cpu")
    free, _ = torch.cuda.mem_get_info(device)
    return device if 4 * n_params < 0.5 * free else torch.device("cpu")


class Trainer:
    def __init__(self, cfg, runtime: Runtime):
        self.cfg, self.rt = cfg, runtime
        self.run_dir = os.path.abspath(os.path.expanduser(cfg.run_dir))
        self.ckpt_root = os.path.join(self.run_dir, cfg.checkpoint.dir)
        enable_stack_dumps(os.path.join(self.run_dir, "stacks", f"rank{runtime.rank}.txt"))  # before any collective
        self.profiler = StepProfiler.from_env(self.run_dir, runtime.rank)  # a bad SPARSETRON_PROFILE fails here
        # lock, identity, new-run/resume rules, writable + free space: before anything is written (run_dir.py)
        self.run_id = claim_run_dir(cfg, runtime, self.run_dir, self.ckpt_root).run_id
        self.skips = SkipCounter(cfg.train.max_skipped_steps)
        self.nan_steps = nan_fault_steps()  # test hook (resilience.FAULT_NAN_ENV); empty in real runs
        t = cfg.train
        auto_note = auto_defaults.resolve(cfg, runtime.device)  # compile / fused_kernels "auto" -> what runs here
        if auto_note and runtime.is_main:
            print(auto_note, flush=True)
        if t.deterministic:
            torch.use_deterministic_algorithms(True)
        resume_from = self._resume_path()  # before any work: a bad path fails fast
        torch.manual_seed(t.seed)
        self.data: Data = build_data(cfg, runtime, self.run_dir)
        counts = parameter_counts(cfg.model, cfg.attention, cfg.moe)
        with torch.device(init_device(cfg, runtime.device, counts["total"])):
            model = Llama(cfg.model, cfg.attention, cfg.moe)
        if t.init_from and not resume_from:  # fine-tuning: weights only; a resume brings its own
            kind = load_pretrained(model, t.init_from)
            if runtime.is_main:
                print(f"sparsetron: initialised from {kind} weights {t.init_from}", flush=True)
        self.sparse = None
        if cfg.sparsity.enabled:  # the dense teacher is copied here, before the model goes N:M
            from .sparsity.recipe import SparseFinetune

            self.sparse = SparseFinetune(model, cfg.sparsity, runtime.device)
        self.engine = build_engine(model, cfg, runtime)
        self.model = self.engine.model
        # "comm_s" per step only with SPARSETRON_COMM_TIMER=1 (parallel/comm_timer.py); else a no-op
        self.comm_timer = StepCommTimer.from_env(self.engine)
        if self.sparse is not None:
            self.sparse.attach(self.engine)
        self.sampler = ResumableSampler(
            len(self.data.train), t.global_batch_size, t.micro_batch_size, self.engine.dp_rank,
            self.engine.dp_size, t.seed,
        )
        self.step = 0
        if resume_from:
            self._load(resume_from)
        elif self.sparse is not None:
            calibration = [self.data.train.batch(range(i * t.micro_batch_size, (i + 1) * t.micro_batch_size))[0]
                           .to(runtime.device) for i in range(self.sparse.cfg.calibration_batches)]
            self.sparse.init_masks(calibration)
        if t.compile:
            self.engine.compile_blocks()
        self.compile_warmup_pending = bool(t.compile)  # the first step compiles: its time is printed once
        n_params = counts["total"]
        self.flops_per_token = flops_per_token(cfg.model, t.seq_len, counts["active"], counts["embedding"])
        self.peak = peak_flops(runtime.device, cfg.logging.peak_tflops)
        if self.peak is None and runtime.device.type == "cuda" and runtime.is_main:
            print(f"sparsetron: no dense bf16 peak known for {torch.cuda.get_device_name(runtime.device)}: no MFU "
                  f"logged; set logging.peak_tflops=<TFLOP/s per GPU>", flush=True)
        self.tokens_per_step = t.global_batch_size * t.seq_len
        self.sink = MetricsSink(cfg, self.run_dir, runtime.is_main, self.step, t.max_steps)
        # SIGUSR1/SIGTERM only set a flag; the loop checkpoints and exits for requeue after the step
        self.preempt = PreemptionHandler().install()
        self.watchdog = Watchdog.from_env(rank=runtime.rank)
        if runtime.is_main:
            OmegaConf.save(cfg, os.path.join(self.run_dir, "config.yaml"))
            print(f"sparsetron: {n_params / 1e6:.1f}M params, {len(self.data.train)} train / {len(self.data.val)} "
                  f"val samples of {t.seq_len} tokens, world {runtime.world_size}, device {runtime.device}, "
                  f"run dir {self.run_dir}" + (f", resumed at step {self.step}" if resume_from else ""), flush=True)

    # ----------------------------------------------------------------------------------- setup
    def _resume_path(self) -> Optional[str]:
        mode = self.cfg.resume
        if mode == "none":
            return None
        say = self._say
        if mode == "auto":  # the newest checkpoint that verifies; one line for each one skipped
            path = ckpt.newest_verified(self.ckpt_root, self.rt, say)
            if path is None:
                say(f"sparsetron: resume=auto: no checkpoint in {self.ckpt_root}; starting from scratch")
            return path
        path = os.path.abspath(os.path.expanduser(mode))
        if not ckpt.verify(path, self.rt):
            say(f"sparsetron: {path} has a legacy COMPLETE marker (no checksums); loading it unverified")
        return path

    def _say(self, line: str) -> None:
        if self.rt.is_main:
            print(line, flush=True)

    # ----------------------------------------------------------------------------- checkpoints
    def _load(self, path: str) -> None:
        ckpt.check_complete(path)
        state = ckpt.read_json(path, "trainer_state.json")
        current = OmegaConf.to_container(self.cfg.model, resolve=True)
        ckpt.check_model_config(path, state.get("model", {}), current)
        if not isinstance(state.get("step"), int) or not isinstance(state.get("sampler"), dict):
            raise ckpt.CheckpointError(f"{path}/trainer_state.json: no integer 'step' and 'sampler' state (corrupt)")
        self.engine.load_checkpoint(path)
        self.skips.total = int(state.get("skipped_steps", 0))
        try:
            self.sampler.load_state_dict(state["sampler"])
        except (ValueError, KeyError, TypeError) as err:
            raise ckpt.CheckpointError(f"{path}/trainer_state.json: {err}") from None
        if self.sparse is not None:
            self.sparse.load_state_dict(ckpt.read_torch(path, "sparsity.pt"))
        rng = ckpt.read_torch(path, "rng.pt")
        torch.set_rng_state(rng["cpu"])
        if self.rt.device.type == "cuda" and "cuda" in rng:
            torch.cuda.set_rng_state(rng["cuda"], self.rt.device)
        self.step = state["step"]

    def save(self) -> None:
        """Collective: rank 0 writes the run state, every rank its engine shards (checkpoint.save)."""
        self.sampler.consumed_samples = self.step * self.cfg.train.global_batch_size
        self._refuse_nonfinite_state()
        # collective: every rank checks its masks are N:M (never written otherwise), shards join on rank 0
        sparse_state = self.sparse.state_dict() if self.sparse is not None else None
        files = {}
        if self.rt.is_main:
            rng = {"cpu": torch.get_rng_state()}
            if self.rt.device.type == "cuda":
                rng["cuda"] = torch.cuda.get_rng_state(self.rt.device)
            model_cfg = OmegaConf.to_container(self.cfg.model, resolve=True)
            files = {
                "rng.pt": rng,
                "trainer_state.json": {
                    "step": self.step,
                    "sampler": self.sampler.state_dict(),
                    "model": {k: model_cfg[k] for k in ckpt.MODEL_SHAPE_KEYS},
                    "world_size": self.rt.world_size,
                    "skipped_steps": self.skips.total,
                },
                "config.yaml": OmegaConf.to_yaml(self.cfg),
            }
            if sparse_state is not None:
                files["sparsity.pt"] = sparse_state
        try:
            ckpt.save(self.ckpt_root, self.step, files, self.cfg.checkpoint.keep_last, runtime=self.rt,
                      rank_writer=self.engine.save_checkpoint, run_id=self.run_id)
        except ckpt.CheckpointWriteError as err:
            raise ckpt.CheckpointWriteError(f"{err}; the newest checkpoint is intact: "
                                            f"{ckpt.latest(self.ckpt_root) or 'none yet'}") from None

    def _refuse_nonfinite_state(self) -> None:
        """Never write a checkpoint with a NaN/Inf parameter or optimizer state (all ranks agree)."""
        from sparsetron.parallel.engine import first_nonfinite, state_tensors

        bad = first_nonfinite(state_tensors(self.engine))
        if self.rt.distributed:
            import torch.distributed as dist

            found = [None] * self.rt.world_size
            dist.all_gather_object(found, bad)
            bad = next((f"{b} (rank {r})" for r, b in enumerate(found) if b), None)
        if bad:
            raise NonFiniteError(f"step {self.step}: {bad} is not finite; checkpoint not written (the newest one, "
                                 f"{ckpt.latest(self.ckpt_root) or 'none'}, is kept)")

    # ---------------------------------------------------------------------------------- steps
    def _micro_batches(self, step: int):
        return [self.data.train.batch(idx) for idx in self.sampler.indices(step)]

    def train_step(self, batches) -> Dict[str, float]:
        lr = lr_at(self.step, self.cfg.optim, self.cfg.train.max_steps)
        return {**self.engine.train_step(batches, lr), "lr": lr}

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean loss over the first eval_batches * global_batch_size validation samples: the same set
        whatever the layout, split over data-parallel ranks in micro-batches."""
        t, val = self.cfg.train, self.data.val
        dp_rank, dp_size = self.engine.dp_rank, self.engine.dp_size
        chunk = t.micro_batch_size * dp_size
        n = min(t.eval_batches * t.global_batch_size, len(val) // chunk * chunk) or chunk
        total = torch.zeros((), device=self.rt.device)
        for start in range(dp_rank * t.micro_batch_size, n, chunk):
            x, y = val.batch([i % len(val) for i in range(start, start + t.micro_batch_size)])
            total += self.engine.eval_loss(x.to(self.rt.device), y.to(self.rt.device))
        return self.rt.all_reduce_mean(total / (n // chunk)).item()

    def fit(self) -> Dict[str, float]:
        t, c = self.cfg.train, self.cfg.checkpoint
        prefetch = Prefetcher(self._micro_batches, self.rt.device, self.cfg.data.prefetch)
        summary: Dict[str, float] = {"start_step": self.step, "preempted": False}
        self.watchdog.start()
        try:
            if self.step == 0 and t.eval_every:
                summary["first_val_loss"] = self._log_val()
            while self.step < t.max_steps:
                self.profiler.at_step(self.step)
                start = time.perf_counter()
                self.comm_timer.reset()
                batches = prefetch.get(self.step)
                with self.watchdog.collective("train step (forward, backward, gradient all-reduce)"), \
                        inject_nan(self._local_modules(), self.step + 1 in self.nan_steps):
                    metrics = self.train_step(batches)
                    if self.rt.device.type == "cuda":
                        torch.cuda.synchronize(self.rt.device)
                dt = time.perf_counter() - start
                self.step += 1
                self.watchdog.beat(self.step)
                skipped = metrics.pop("skipped", False)  # the non-finite guard (parallel/engine.agree_finite)
                self.skips.update(self.step, skipped, metrics["loss"], metrics.get("grad_norm"), self._say)
                if self.compile_warmup_pending:
                    self.compile_warmup_pending = False
                    if self.rt.is_main:
                        print(f"sparsetron: torch.compile warm-up: the first step took {dt:.1f} s", flush=True)
                record = {"kind": "train", "step": self.step, **metrics, "step_time_s": dt,
                          "tokens_per_s": self.tokens_per_step / dt, "mem_gib": peak_memory_gib(self.rt.device)}
                record.update(self.comm_timer.record())
                if self.skips.total:
                    record["skipped_steps"] = self.skips.total
                if self.sparse is not None:
                    record.update(self.sparse.last_metrics)
                if self.cfg.model.mlp == "moe":
                    with_loads = bool(t.eval_every) and self.step % t.eval_every == 0
                    record.update(routing_metrics(self.model, with_loads))
                if self.peak:
                    record["mfu"] = self.flops_per_token * self.tokens_per_step / dt / (self.peak * self.rt.world_size)
                if self.step % self.cfg.logging.log_every == 0 or self.step == t.max_steps:
                    self.sink.log(record)
                summary.update(loss=metrics["loss"], tokens_per_s=record["tokens_per_s"], mfu=record.get("mfu", 0.0))
                if t.eval_every and (self.step % t.eval_every == 0 or self.step == t.max_steps):
                    summary["final_val_loss"] = self._log_val()
                with self.watchdog.collective("preemption vote (all-reduce)"):
                    stop = self.preempt.stop_agreed()
                if stop:
                    self.preempt.stop_listening()
                    if self.rt.is_main:
                        print(f"sparsetron: {self.preempt.signal_name} at step {self.step}: checkpointing, then "
                              f"exit {REQUEUE_EXIT_CODE} for requeue", flush=True)
                    summary["preempted"] = True
                    break
                if c.every and self.step % c.every == 0 and self.step < t.max_steps:
                    with self.watchdog.suspended():
                        self.save()
            if c.save_final or summary["preempted"]:
                with self.watchdog.suspended():
                    self.save()
            self.profiler.at_step(self.step, last=True)
        finally:
            self.watchdog.stop()
            if not summary["preempted"]:
                self.preempt.uninstall()
            prefetch.close()
            self.sink.close()
        if self.rt.is_main and self.cfg.logging.plot:
            plot_losses(self.run_dir)
        summary["step"] = self.step
        return summary

    def _local_modules(self):
        return self.engine.local_modules() if hasattr(self.engine, "local_modules") else [self.engine.model]

    def _log_val(self) -> float:
        val = self.evaluate()
        self.sink.log({"kind": "val", "step": self.step, "loss": val})
        return val


def train(cfg) -> Dict[str, float]:
    """Validate, start the runtime, train, shut down. Returns a summary (losses, throughput)."""
    adopt_hf_model_config(cfg)  # train.init_from on an HF folder: its model fields win (train/pretrained.py)
    validate(cfg, int(os.environ.get("WORLD_SIZE", "1")))
    if cfg.parallel.offload_optimizer != "none" or cfg.parallel.offload_param != "none":
        from sparsetron.parallel.deepspeed_config import check_offload_fits  # host RAM / NVMe disk, before any work

        check_offload_fits(cfg, parameter_counts(cfg.model, cfg.attention, cfg.moe)["total"],
                           int(os.environ.get("WORLD_SIZE", "1")))
    old_mask = defer_preemption_signals()  # until the handler is installed; keeps them off gloo's threads
    runtime = init_runtime(cfg.train.device, cfg.parallel.backend)
    try:
        summary = Trainer(cfg, runtime).fit()
    except BaseException as err:
        note_exit_status(getattr(err, "exit_code", 2) if isinstance(err, user_errors()) else None)
        if runtime.distributed and not isinstance(err, (SystemExit, *user_errors())):
            # Printed now, not after the shutdown below: Python shows the error only once the shutdown
            # returns, and with peers blocked on this rank it might not (a pipeline stage's error hid
            # behind such a hang on 4 GPUs).
            traceback.print_exc()
            sys.stderr.flush()
        shutdown(runtime, failed=True)
        raise
    finally:
        release_run_dir(cfg)  # the run dir's lock (held by rank 0 from Trainer start)
        signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
    if summary.get("preempted"):
        note_exit_status(REQUEUE_EXIT_CODE)  # for launch/torchrun.sh: torchrun itself would say 1
    shutdown(runtime)
    return summary


def user_errors() -> tuple:
    """Exceptions that are the user's input (config, data, checkpoint): reported as one line."""
    from sparsetron.configs.schema.validate import ConfigError

    from .data import DataError

    return (ConfigError, DataError, ckpt.CheckpointError, RunDirError, NonFiniteError)


__all__: List[str] = ["Trainer", "train", "user_errors"]

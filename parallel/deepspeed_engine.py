"""Data parallel with DeepSpeed ZeRO (stages 0-3), optimizer/parameter offload to CPU or NVMe
(ZeRO-Offload / ZeRO-Infinity), composed with tensor parallel through DeepSpeed's `mpu` hook.

The JSON comes from deepspeed_config.py. Checkpoints: DeepSpeed's own files (same-layout exact
resume, under <ckpt>/deepspeed/) plus the weights in the layout-independent shard format of
reshard.py, so convert / HF export work from a DeepSpeed run as from any other."""

import contextlib
import copy
import os
from typing import Dict, List

import torch
import torch.distributed as dist

from . import reshard as rs
from .engine_protocol import StepLoop
from .groups import ParallelGroups
from .runtime import Runtime
from .tensor_parallel import parallelize, sequence_parallel_params

DS_TAG = "deepspeed"


def prepare_deepspeed_env(device: torch.device) -> None:
    """DeepSpeed picks its accelerator from the environment: say CPU explicitly when training there,
    and skip the JIT build of its shared-memory all-reduce op (used only by inference_all_reduce;
    a multi-minute C++ compile on a small CPU machine)."""
    if device.type == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed.ops

    if device.type == "cpu":
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class DeepSpeedEngine(StepLoop):
    # ZeRO 1-3 reduce gradients into their own partitioned buffers during/after backward: a step hook
    # never sees them in param.grad (the N:M recipe then adds its SR-STE decay inside backward)
    grads_in_params = False

    def __init__(self, model: torch.nn.Module, cfg, runtime: Runtime, groups: ParallelGroups):
        prepare_deepspeed_env(runtime.device)
        import deepspeed

        from sparsetron.train.optim import build_optimizer

        from .deepspeed_config import deepspeed_config, host_threads_per_rank, offload_tuning_line

        self.cfg, self.rt, self.g = cfg, runtime, groups
        self.dp_rank, self.dp_size = groups.dp_rank, groups.dp
        self.autocast = contextlib.nullcontext  # DeepSpeed casts the model itself (its bf16 config)
        self._init_plugins()
        if not any(hasattr(prm, "ds_id") for prm in model.parameters()):  # not built under zero.Init
            model = model.to(runtime.device)
        else:  # zero.Init partitioned the parameters; buffers (RoPE tables) still need the device
            for module in model.modules():
                for name, buf in module._buffers.items():
                    if buf is not None:
                        module._buffers[name] = buf.to(runtime.device)
        self.model = parallelize(model, groups, cfg.parallel)
        if groups.tp > 1 and cfg.parallel.sequence_parallel:
            for prm in sequence_parallel_params(self.model):  # partial grads (own sequence slice): sum over tp
                prm.register_hook(self._tp_sum_hook)
        sizes = [getattr(prm, "ds_numel", prm.numel()) for prm in self.model.parameters()]  # zero.Init: ds_numel
        self.ds_config = deepspeed_config(cfg, groups.dp, runtime.device, n_params=sum(sizes),
                                          largest_param=max(sizes, default=0))
        threads = host_threads_per_rank() if self._offloaded() else None
        if threads:
            torch.set_num_threads(threads)  # the host-side Adam's OpenMP threads (DeepSpeedCPUAdam, torch AdamW)
        if runtime.is_main and self._offloaded():
            print(offload_tuning_line(self.ds_config, threads), flush=True)  # what was chosen for the user, once
        client_opt = None
        self.optimizer_impl = "deepspeed_json"  # an `optimizer` block in deepspeed_overrides: DeepSpeed builds it
        if "optimizer" not in self.ds_config:
            self.optimizer_impl = cfg.optim.offload_impl if self._offloaded() else "torch"
            if self.optimizer_impl == "deepspeed_cpu_adam":
                self._build_cpu_adam_op_once()
            client_opt = build_optimizer(self.model, cfg.optim, torch.device("cpu") if self._offloaded() else runtime.device,
                                         host_offload=self._offloaded(), announce=None)
        if not runtime.distributed:  # ZeRO needs a process group even for one process
            for key, value in (("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", str(_free_port())), ("RANK", "0"),
                               ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1")):
                os.environ.setdefault(key, value)
        deepspeed.init_distributed(dist_backend=runtime.backend or ("nccl" if runtime.device.type == "cuda" else "gloo"))
        self.ds, self.optimizer, _, _ = deepspeed.initialize(
            model=self.model, optimizer=client_opt, config=self.ds_config,
            model_parameters=None if client_opt is not None else [p for p in self.model.parameters() if p.requires_grad],
            mpu=groups.as_deepspeed_mpu() if runtime.distributed else None, dist_init_required=False)

    def _offloaded(self) -> bool:
        p = self.cfg.parallel
        return p.offload_optimizer != "none"

    def _build_cpu_adam_op_once(self) -> None:
        """DeepSpeed's cpu_adam op, JIT-built by one rank per host while the others wait (ranks compiling
        into the same cache at once can crash); a failed build fails every rank with the same advice."""
        from sparsetron.configs.schema.validate import ConfigError
        from sparsetron.train.optim import load_cpu_adam_op

        announce = print if self.rt.is_main else None
        first = self.rt.local_rank == 0
        error = None
        if first or not self.rt.distributed:
            try:
                load_cpu_adam_op(announce)
            except ConfigError as err:
                error = err
        if self.rt.distributed:
            failed = torch.tensor([int(error is not None)], device=self.rt.device)
            dist.all_reduce(failed)  # also the barrier: the others load only once the cache is filled
            if failed.item() and error is None:
                error = ConfigError("optim.offload_impl", "DeepSpeed's CPU Adam op could not be built on another "
                                    "rank (see its message); set optim.offload_impl=torch to run torch AdamW instead")
        if error is not None:
            raise error
        if not first:
            load_cpu_adam_op(announce)  # from the cache the first rank filled

    def _tp_sum_hook(self, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        dist.all_reduce(grad, group=self.g.tp_group)
        return grad

    # ------------------------------------------------------------------------------- steps
    # the step itself is engine_protocol.StepLoop.train_step; DeepSpeed's engine accumulates, syncs,
    # clips and steps: backward through it, and its step() after every micro-batch (it updates at the
    # accumulation boundary only)
    def _train_mode(self) -> None:
        self.ds.train()

    def _param_groups(self):
        return self.ds.optimizer.param_groups

    def _forward_module(self):
        return self.ds

    def _backward(self, objective: torch.Tensor, index: int, n: int) -> None:
        self.ds.backward(objective)  # DeepSpeed divides by the accumulation steps
        if index < n - 1:
            self.ds.step()

    def _clip_grads(self):
        """DeepSpeed's step clips and updates in one call: the update happens here (the non-finite check
        follows, in _optimizer_step). Returns the global gradient norm."""
        norm = None
        if self.cfg.parallel.zero_stage == 0:  # DeepSpeed reports no norm here
            from .native import global_grad_norm

            norm = global_grad_norm(self.model.parameters(), self.g)
        self.ds.step()  # the accumulation boundary: sync, clip, update
        return self.ds.get_global_grad_norm() if norm is None else norm

    def _optimizer_step(self, finite: bool) -> None:
        # Non-finite guard: ZeRO 1-3 already discard a step whose global gradient norm is NaN/Inf (their
        # overflow check; the norm then reads inf). The shared decision makes every rank agree and report it.
        if not finite and getattr(self.ds, "_step_applied", False):
            from sparsetron.train.resilience import NonFiniteError

            raise NonFiniteError(f"DeepSpeed (zero_stage={self.cfg.parallel.zero_stage}) applied an update with a "
                                 f"non-finite loss/gradient norm; resume from the last checkpoint")

    # -------------------------------------------------------------------- plug-in support
    def local_modules(self) -> List[torch.nn.Module]:
        return [self.model]

    def full_params(self, params):
        """ZeRO-3 holds a 1/dp partition of each parameter: gather the full values (read-only) for the
        duration; other stages hold them whole."""
        if self.cfg.parallel.zero_stage != 3:
            return contextlib.nullcontext()
        import deepspeed

        return deepspeed.zero.GatheredParameters(list(params), modifier_rank=None)

    @torch.no_grad()
    def forward_only(self, tokens: torch.Tensor) -> None:
        self.ds.eval()
        self.ds(tokens)  # through DeepSpeed's engine: ZeRO-3 gathers each module's parameters in its hooks

    def shard_frozen(self, module: torch.nn.Module):
        """A frozen copy of the dense model (distillation teacher), placed as the student is: TP-sharded,
        and under ZeRO-3 partitioned over dp by a second DeepSpeed engine without an optimizer (its
        hooks gather each module's parameters for its forward, as for the student; offload_param
        applies too; under bf16 DeepSpeed casts it to bf16). ZeRO 0-2 keep parameters whole on every
        rank, the student's too."""
        module = parallelize(module, self.g, self.cfg.parallel)
        if self.cfg.parallel.zero_stage != 3:
            return module.to(self.rt.device)
        import deepspeed

        frozen = {k: copy.deepcopy(v) for k, v in self.ds_config.items() if k not in ("optimizer", "scheduler")}
        zero = frozen["zero_optimization"]
        for key in ("offload_optimizer", "sub_group_size"):
            zero.pop(key, None)
        teacher, *_ = deepspeed.initialize(model=module, config=frozen, model_parameters=None,
                                           mpu=self.g.as_deepspeed_mpu() if self.rt.distributed else None,
                                           dist_init_required=False)
        teacher.eval()
        return teacher

    @torch.no_grad()
    def eval_loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        self.ds.eval()
        return self.ds(x, y).float()

    # ------------------------------------------------------------------------- checkpoints
    def _gathered_weights(self) -> Dict[str, torch.Tensor]:
        if self.cfg.parallel.zero_stage == 3:
            import deepspeed

            params = [p for p in self.model.parameters()]
            with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
                from sparsetron.train.checkpoint import unique_tensors

                return unique_tensors(self.model.state_dict())
        from sparsetron.train.checkpoint import unique_tensors

        return unique_tensors(self.model.state_dict())

    def consolidated_state_dict(self):
        """Collective. The full model's weights on rank 0 (None elsewhere)."""
        weights = self._gathered_weights()
        mine = weights if self.g.dp_rank == 0 else None
        if not self.rt.distributed:
            return mine
        parts = [None] * self.rt.world_size if self.rt.is_main else None
        dist.gather_object(((self.g.tp_rank, 0, 0), mine), parts, dst=0)
        if not self.rt.is_main:
            return None
        return rs._join_shards({k: v for k, v in parts if v is not None}, self.g.tp, 1)

    def layout_info(self) -> dict:
        p = self.cfg.parallel
        return {"tp": self.g.tp, "pp": 1, "dp": self.g.dp, "cp": self.g.cp, "ep": self.g.ep, "stages": None,
                "zero_stage": p.zero_stage, "engine": "deepspeed", "sequence_parallel": bool(p.sequence_parallel),
                "offload_optimizer": p.offload_optimizer, "offload_param": p.offload_param}

    def save_checkpoint(self, directory: str) -> None:
        """Collective. DeepSpeed's files (exact resume) + this tp rank's weights (any-layout reuse)."""
        from sparsetron.train.checkpoint import write_files

        self.ds.save_checkpoint(directory, tag=DS_TAG, save_latest=False)
        weights = self._gathered_weights()
        if self.g.dp_rank == 0:
            write_files(directory, {rs.model_file(self.g.tp_rank, 0, self.g.tp, 1): weights})
        if self.rt.is_main:
            write_files(directory, {rs.LAYOUT: {**self.layout_info(), "optimizer": "deepspeed",
                                                "optimizer_impl": self.optimizer_impl}})

    def load_checkpoint(self, path: str) -> None:
        from sparsetron.train import checkpoint as ckpt

        saved, mine = rs.read_layout(path), self.layout_info()
        same = saved.get("engine") == "deepspeed" and all(saved.get(k) == mine[k] for k in ("tp", "dp", "zero_stage"))
        if same:
            self._check_optimizer_switch(saved.get("optimizer_impl", "torch"), path)  # before: only torch AdamW
            loaded, _ = self.ds.load_checkpoint(path, tag=DS_TAG, load_module_strict=True,
                                                load_optimizer_states=True, load_lr_scheduler_states=False)
            if loaded is None:
                raise ckpt.CheckpointError(f"{path}/{DS_TAG}: DeepSpeed could not load its checkpoint")
            self._adopt_loaded_optimizer_state()
            return
        if saved.get("optimizer") is not None:
            raise ckpt.CheckpointError(
                f"{path}: saved at layout engine={saved.get('engine')} tp={saved.get('tp')} pp={saved.get('pp')} "
                f"dp={saved.get('dp')} zero_stage={saved.get('zero_stage')}; this DeepSpeed run is tp={mine['tp']} "
                f"dp={mine['dp']} zero_stage={mine['zero_stage']}. Its optimizer state cannot move into DeepSpeed: "
                f"resume at the saved layout, or convert it to weights only first: "
                f"python -m sparsetron.parallel.reshard {path} NEW_CKPT --weights-only")
        self._set_weights(rs.consolidated_weights(path), path)

    def _check_optimizer_switch(self, saved_impl: str, path: str) -> None:
        """torch AdamW <-> DeepSpeedCPUAdam resume exactly into each other with the state on the host
        (same fp32 moments and step count; tests/test_offload_cpu_adam.py); other switches -- an
        optimizer from deepspeed_overrides, or NVMe-swapped state, untested -- are refused."""
        from sparsetron.train import checkpoint as ckpt

        mine = self.optimizer_impl
        if saved_impl == mine:
            return
        exchangeable = {saved_impl, mine} == {"torch", "deepspeed_cpu_adam"} and self.cfg.parallel.offload_optimizer != "nvme"
        def said(impl: str) -> str:
            return ("an `optimizer` block in parallel.deepspeed_overrides" if impl == "deepspeed_json"
                    else f"optim.offload_impl={impl}")

        if not exchangeable:
            raise ckpt.CheckpointError(
                f"{path}: its optimizer state was written with {said(saved_impl)}, this run uses {said(mine)} "
                f"(parallel.offload_optimizer={self.cfg.parallel.offload_optimizer}); that switch cannot carry the "
                f"state: resume with {said(saved_impl)}, or convert to weights only first: "
                f"python -m sparsetron.parallel.reshard {path} NEW_CKPT --weights-only")
        if self.rt.is_main:
            print(f"sparsetron: resuming optimizer state of optim.offload_impl={saved_impl} with {mine} "
                  f"(Adam moments and step count carry over)", flush=True)

    def _adopt_loaded_optimizer_state(self) -> None:
        """A state dict saved by torch AdamW, read into DeepSpeedCPUAdam: its step counts are tensors
        (the C++ op takes an int) and its groups lack `bias_correction`. torch AdamW converts the other
        way by itself (its __setstate__)."""
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        inner = getattr(self.ds.optimizer, "optimizer", self.ds.optimizer)
        if not isinstance(inner, DeepSpeedCPUAdam):
            return
        for group in inner.param_groups:
            group.setdefault("bias_correction", True)
            group.setdefault("amsgrad", False)
        for state in inner.state.values():
            if torch.is_tensor(state.get("step")):
                state["step"] = int(state["step"].item())

    def _set_weights(self, full: Dict[str, torch.Tensor], path: str) -> None:
        """Weights from full tensors into every ZeRO representation (model copy + fp32 master)."""
        import deepspeed
        from deepspeed.utils import safe_set_full_fp32_param

        from sparsetron.train import checkpoint as ckpt

        params = dict(self.model.named_parameters())
        missing = [n for n in params if n not in full]
        if missing:
            raise ckpt.CheckpointError(f"{path}: weights do not fit the model (missing {missing[:5]})")
        stage3 = self.cfg.parallel.zero_stage == 3
        for name, prm in params.items():
            value = rs.tp_slice(name, full[name], self.g.tp, self.g.tp_rank).to(self.rt.device)
            if stage3:
                with deepspeed.zero.GatheredParameters([prm], modifier_rank=self.g.dp_ranks[0]):
                    prm.data.copy_(value)  # every dp rank holds the same value: the broadcast keeps it
            else:
                with torch.no_grad():
                    prm.data.copy_(value.to(prm.dtype))
            safe_set_full_fp32_param(prm, value.float())

    def compile_blocks(self) -> None:
        for block in self.model.layers:
            block.compile()

"""Checkpoint shards at any layout, and conversion between layouts.

On disk a checkpoint holds `layout.json` and, per (tp rank, pp rank), the tensors that rank owns
under the *full model's* parameter names: `model-tp{t}-pp{p}.safetensors` (`model.safetensors`
when tp = pp = 1), and for the native engine the AdamW state keyed the same way
(`optimizer-tp{t}-pp{p}.pt` / `optimizer.pt`). Pipeline stages own disjoint names; tensor-parallel
shards of one name are joined along the dimension `split_dim` gives. So any layout can be
consolidated to the full model and sliced again for another layout, weights and (native) AdamW
moments alike.

    python -m sparsetron.parallel.reshard SRC_CKPT DST_CKPT [--weights-only]   # -> tp=1, pp=1 (full model)
    python -m sparsetron.parallel.reshard SRC_CKPT --hf OUT_DIR [--dtype bf16]   # HF Llama folder
"""

import argparse
import json
import os
import re
import shutil
import sys
from typing import Dict, Optional

import torch

LAYOUT = "layout.json"
_COLUMN = re.compile(r"(^embed\.weight$|^head\.weight$|\.(q_proj|k_proj|v_proj|gate_proj|up_proj)\.weight$)")
_ROW = re.compile(r"\.(o_proj|down_proj)\.weight$")


def split_dim(name: str) -> Optional[int]:
    """The dimension tensor parallel splits parameter `name` along (None: replicated)."""
    if _COLUMN.search(name):
        return 0
    if _ROW.search(name):
        return 1
    return None


def _suffix(tp_rank: int, pp_rank: int, tp: int, pp: int, ep_rank: int, ep: int) -> str:
    if tp == pp == ep == 1:
        return ""
    return f"-tp{tp_rank:02d}-pp{pp_rank:02d}" + (f"-ep{ep_rank:02d}" if ep > 1 else "")


def model_file(tp_rank: int, pp_rank: int, tp: int, pp: int, ep_rank: int = 0, ep: int = 1) -> str:
    return f"model{_suffix(tp_rank, pp_rank, tp, pp, ep_rank, ep)}.safetensors"


def optimizer_file(tp_rank: int, pp_rank: int, tp: int, pp: int, ep_rank: int = 0, ep: int = 1) -> str:
    return f"optimizer{_suffix(tp_rank, pp_rank, tp, pp, ep_rank, ep)}.pt"


def is_expert(name: str, t: torch.Tensor) -> bool:
    """MoE expert weights, stacked (E, out, in): expert parallel splits them along dim 0."""
    return t.dim() == 3 and name.endswith(("mlp.gate_up_proj.weight", "mlp.down_proj.weight"))


def ep_slice(name: str, full: torch.Tensor, ep: int, ep_rank: int) -> torch.Tensor:
    if ep == 1 or not is_expert(name, full):
        return full
    per = full.shape[0] // ep
    return full[ep_rank * per : (ep_rank + 1) * per].contiguous()


def tp_slice(name: str, full: torch.Tensor, tp: int, tp_rank: int) -> torch.Tensor:
    dim = split_dim(name)
    if tp == 1 or dim is None or full.dim() == 0:
        return full
    per = full.shape[dim] // tp
    return full.narrow(dim, tp_rank * per, per).contiguous()


def tp_join(name: str, shards) -> torch.Tensor:
    dim = split_dim(name)
    if len(shards) == 1 or dim is None or shards[0].dim() == 0:
        return shards[0]
    return torch.cat(list(shards), dim=dim)


def read_layout(path: str) -> dict:
    """layout.json, or the single-process layout for checkpoints written before it existed."""
    file = os.path.join(path, LAYOUT)
    if not os.path.exists(file):
        return {"tp": 1, "pp": 1, "dp": 1, "engine": "native", "optimizer": "native"}
    from sparsetron.train.checkpoint import read_json

    return read_json(path, LAYOUT)


def _join_shards(per_file: Dict[tuple, Dict[str, torch.Tensor]], tp: int, pp: int, ep: int = 1) -> Dict[str, torch.Tensor]:
    """per_file[(tp_rank, pp_rank, ep_rank)] -> the full model (experts joined over ep, then tp)."""
    full: Dict[str, torch.Tensor] = {}
    for p in range(pp):
        for name in per_file[(0, p, 0)]:
            def over_ep(t, name=name):
                if ep == 1 or not is_expert(name, per_file[(t, p, 0)][name]):
                    return per_file[(t, p, 0)][name]
                return torch.cat([per_file[(t, p, e)][name] for e in range(ep)], dim=0)

            full[name] = tp_join(name, [over_ep(t) for t in range(tp)])
    return full


def consolidated_weights(path: str) -> Dict[str, torch.Tensor]:
    """The full model's weights from a checkpoint at any layout."""
    from sparsetron.train.checkpoint import read_tensors

    lay = read_layout(path)
    tp, pp, ep = lay["tp"], lay["pp"], lay.get("ep", 1) if lay.get("engine") == "native" else 1
    shards = {(t, p, e): read_tensors(path, model_file(t, p, tp, pp, e, ep))
              for t in range(tp) for p in range(pp) for e in range(ep)}
    return _join_shards(shards, tp, pp, ep)


def consolidated_optimizer(path: str) -> Optional[dict]:
    """The full, name-keyed AdamW state of a native-engine checkpoint (None if it has none)."""
    from sparsetron.train.checkpoint import read_torch

    lay = read_layout(path)
    if lay.get("optimizer") != "native":
        return None
    tp, pp, ep = lay["tp"], lay["pp"], lay.get("ep", 1)
    parts = {(t, p, e): read_torch(path, optimizer_file(t, p, tp, pp, e, ep))
             for t in range(tp) for p in range(pp) for e in range(ep)}
    state: Dict[str, dict] = {}
    for p in range(pp):
        for name, entry in parts[(0, p, 0)]["state"].items():
            state[name] = {}
            for k, v in entry.items():
                if not torch.is_tensor(v) or v.dim() == 0:
                    state[name][k] = v
                    continue
                per_file = {key: {name: part["state"][name][k]} for key, part in parts.items() if key[1] == p}
                state[name][k] = _join_shards({(t, 0, e): per_file[(t, p, e)] for t in range(tp) for e in range(ep)},
                                              tp, 1, ep)[name]
    return {"state": state, "param_groups": parts[(0, 0, 0)]["param_groups"]}


# ------------------------------------------------------------------------ name-keyed AdamW state
def named_optimizer_state(optimizer: torch.optim.Optimizer, names: Dict[int, str]) -> dict:
    """optimizer.state_dict() with parameter names instead of positions (`names`: id(param) -> name)."""
    sd = optimizer.state_dict()
    order = [names[id(p)] for group in optimizer.param_groups for p in group["params"]]
    state = {order[i]: {k: (v.detach().cpu().clone() if torch.is_tensor(v) else v) for k, v in s.items()}
             for i, s in sd["state"].items()}
    groups = [{k: v for k, v in g.items() if k != "params"} | {"names": [order[i] for i in g["params"]]}
              for g in sd["param_groups"]]
    return {"state": state, "param_groups": groups}


def positional_optimizer_state(optimizer: torch.optim.Optimizer, named: dict, names: Dict[int, str],
                               local: Dict[str, torch.Tensor], tp: int, tp_rank: int, ep: int = 1,
                               ep_rank: int = 0) -> dict:
    """The inverse of named_optimizer_state for this optimizer, slicing full-model state for this tp
    rank when `named` is consolidated (shapes are checked against the local parameters)."""
    sd = optimizer.state_dict()
    order = [names[id(p)] for group in optimizer.param_groups for p in group["params"]]
    state = {}
    for i, name in enumerate(order):
        if name not in named["state"]:
            continue
        entry = {}
        for k, v in named["state"][name].items():
            if torch.is_tensor(v) and v.dim() > 0:
                if v.shape != local[name].shape:
                    v = ep_slice(name, tp_slice(name, v, tp, tp_rank), ep, ep_rank)
                if v.shape != local[name].shape:
                    raise ValueError(f"optimizer state {name}.{k} has shape {tuple(v.shape)}, the parameter "
                                     f"{tuple(local[name].shape)}")
            entry[k] = v
        state[i] = entry
    saved_groups = named["param_groups"]
    groups = []
    for g, saved in zip(sd["param_groups"], saved_groups):
        groups.append({**{k: v for k, v in saved.items() if k != "names"}, "params": g["params"]})
    return {"state": state, "param_groups": groups}


# ------------------------------------------------------------------------------------ CLI
def convert(src: str, dst: str, weights_only: bool = False) -> str:
    """Write SRC (any layout) as a complete single-process checkpoint at DST (tp = pp = 1), keeping
    the AdamW state of native-engine checkpoints; other optimizer states (DeepSpeed) are dropped
    (layout.json says so) and the run resumes from the weights with fresh moments."""
    from sparsetron.train import checkpoint as ckpt

    ckpt.verify(src)  # a damaged source is refused here, not converted
    opt = None if weights_only else consolidated_optimizer(src)
    files: Dict[str, object] = {"model.safetensors": consolidated_weights(src)}
    if opt is not None:
        files["optimizer.pt"] = opt
    files[LAYOUT] = {"tp": 1, "pp": 1, "dp": 1, "engine": "native", "optimizer": "native" if opt else None,
                     "converted_from": read_layout(src)}
    tmp = dst.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    ckpt.write_files(tmp, files)
    for name in ("trainer_state.json", "config.yaml", "rng.pt"):  # the run's state travels unchanged
        if os.path.exists(os.path.join(src, name)):
            shutil.copy(os.path.join(src, name), os.path.join(tmp, name))
    step = ckpt.read_json(src, "trainer_state.json").get("step", 0) if os.path.exists(
        os.path.join(src, "trainer_state.json")) else 0
    manifest = ckpt.build_manifest(tmp, step)  # the converted checkpoint verifies like a saved one
    ckpt.write_files(tmp, {ckpt.COMPLETE: json.dumps(manifest, indent=1) + "\n"})
    if os.path.exists(dst):
        shutil.rmtree(dst)
    os.rename(tmp, dst)
    return dst


def export_hf_from_checkpoint(src: str, out: str, dtype: torch.dtype) -> str:
    from sparsetron.train.export import load_model_from_checkpoint
    from sparsetron.train.hf import export_hf

    return export_hf(load_model_from_checkpoint(src), out, dtype)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("src", help="a checkpoint directory at any layout")
    ap.add_argument("dst", nargs="?", help="output checkpoint directory (tp=1, pp=1)")
    ap.add_argument("--hf", help="write a Hugging Face Llama folder here instead")
    ap.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="bf16")
    ap.add_argument("--weights-only", action="store_true",
                    help="drop the optimizer state (needed to move a DeepSpeed checkpoint to another layout)")
    args = ap.parse_args(argv)
    from sparsetron.train.checkpoint import CheckpointError

    if bool(args.dst) == bool(args.hf):
        ap.error("give exactly one of DST or --hf OUT")
    try:
        if args.hf:
            dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
            print(f"exported to {export_hf_from_checkpoint(args.src, args.hf, dtype)}")
        else:
            print(f"converted to {convert(args.src, args.dst, args.weights_only)}")
    except CheckpointError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

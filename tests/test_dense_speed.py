"""Activation-checkpointing policies (same gradients as none, and each recomputes what it says) and
the dense speed benchmark's accounting (`--dry-run`: CPU, tiny model, no torchtitan)."""

import json

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from sparsetron.benchmarks.dense_speed import MODEL_TINY, classify_kernel, main
from sparsetron.configs.schema import ModelConfig
from sparsetron.train.model import Llama
from sparsetron.train.model.checkpointing import POLICIES, check_policy

SMALL = dict(vocab_size=211, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=96, max_seq_len=64)


def _grads(model, tokens, targets):
    loss = model(tokens, targets)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("fused", [False, True])
def test_policies_give_the_gradients_of_no_checkpointing(fused):
    torch.manual_seed(0)
    tokens = torch.randint(0, 211, (2, 21))
    targets = torch.randint(0, 211, (2, 21))
    base = Llama(ModelConfig(**SMALL, fused_kernels=fused))
    ref_loss, ref = _grads(base, tokens, targets)
    for policy in POLICIES[1:] if not fused else ("selective", "full"):
        model = Llama(ModelConfig(**SMALL, fused_kernels=fused, activation_checkpointing=policy))
        model.load_state_dict(base.state_dict())
        loss, grads = _grads(model, tokens, targets)
        assert torch.equal(loss, ref_loss), policy
        for name, g in ref.items():
            # recomputation runs the same ops on the same inputs: equal up to summation order
            torch.testing.assert_close(grads[name], g, rtol=1e-5, atol=1e-7, msg=f"{policy} {name}")


class _CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.counts = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        self.counts[name] = self.counts.get(name, 0) + 1
        return func(*args, **(kwargs or {}))


def _backward_ops(policy):
    torch.manual_seed(0)
    model = Llama(ModelConfig(**SMALL, activation_checkpointing=policy))
    tokens = torch.randint(0, 211, (2, 16))
    loss = model(tokens, tokens.roll(-1, 1))
    with _CountOps() as mode:
        loss.backward()
    return mode.counts


def test_policies_recompute_what_they_say():
    none, selective, full = (_backward_ops(p) for p in ("none", "selective", "full"))
    matmuls = lambda c: c.get("mm", 0) + c.get("addmm", 0) + c.get("bmm", 0)  # noqa: E731
    norms = lambda c: c.get("rsqrt", 0)  # noqa: E731
    # selective keeps every matmul output: no matmul reruns, but the norms are recomputed
    assert matmuls(selective) == matmuls(none)
    assert norms(selective) > norms(none)
    # full reruns each block's forward up to its last needed tensor: q, k, v, o, gate, up (the
    # down projection's output is never saved, so checkpoint's early stop skips it)
    assert matmuls(full) == matmuls(none) + 6 * SMALL["n_layers"]


def test_bad_policy_is_one_clear_error():
    with pytest.raises(ValueError, match="activation_checkpointing.*allowed: none, attention, selective, full"):
        check_policy("some")
    with pytest.raises(ValueError, match="activation_checkpointing"):
        Llama(ModelConfig(**SMALL, activation_checkpointing="everything"))


def test_dry_run_flops_and_mfu_match_a_hand_computation(tmp_path):
    out = tmp_path / "dense_speed.json"
    peak_tflops = 1e-3
    main(["--dry-run", "--out", str(out), "--variants", "eager+torch", "--seqs", "48",
          "--warmup", "1", "--steps", "2", "--micro-batch", "3", "--peak-tflops", str(peak_tflops)])
    report = json.loads(out.read_text())
    (r,) = report["results"]
    assert "error" not in r and r["seq_len"] == 48 and r["micro_batch"] == 3

    m = MODEL_TINY
    d, L, V, f, hd = m["dim"], m["n_layers"], m["vocab_size"], m["ffn_dim"], m["dim"] // m["n_heads"]
    per_layer = d * d + 2 * d * (m["n_kv_heads"] * hd) + d * d + 3 * d * f + 2 * d  # q, k+v, o, MLP, 2 norms
    params = V * d + L * per_layer + d + (0 if m["tie_embeddings"] else V * d)  # embed, blocks, norm, head
    assert r["n_params"] == params
    flops = 6 * (params - V * d) + 12 * L * d * 48  # PaLM: 6N without the embedding + attention
    assert r["flops_per_token"] == flops
    assert r["tokens_per_s"] == pytest.approx(3 * 48 / r["step_s"], rel=1e-12)
    assert r["mfu"] == pytest.approx(r["tokens_per_s"] * flops / (peak_tflops * 1e12), rel=1e-12)
    assert report["summary"]["48"]["best_variant"] == "eager+torch"


@pytest.mark.parametrize("name,group", [
    ("void pytorch_flash::flash_bwd_dq_dk_dv_loop_seqk_parallel_kernel<...>", "attention"),
    ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64", "matmuls"),
    ("nvjet_tst_192x192_64x4_2x1_v_bz_coopA_NTN", "matmuls"),
    ("triton_red_fused__to_copy_add_mean_mul_pow_rsqrt_0", "norms"),
    ("_rms_norm_fwd_kernel", "norms"),
    ("void at::native::(anonymous namespace)::cunn_SoftMaxForward<...>", "loss"),
    ("void at::native::reduce_kernel<512, 1, at::native::ReduceOp<float, at::native::MeanOps<float>>>", "norms"),
    ("triton_tem_fused_flex_attention_backward_0", "attention"),
    ("_linear_ce_fwd_kernel", "loss"),
    ("void at::native::fused_adam_kernel<...>", "optimizer"),
    ("void at::native::(anonymous namespace)::multi_tensor_apply_kernel<...>", "optimizer"),
    ("void at::native::vectorized_elementwise_kernel<4, at::native::CUDAFunctor_add<float>>", "other"),
])
def test_kernel_names_fall_in_the_right_group(name, group):
    assert classify_kernel(name) == group


@pytest.mark.skipif(__import__("shutil").which("g++") is None, reason="inductor on CPU needs a C++ compiler")
@pytest.mark.parametrize("policy", ["none", "selective", "full"])
def test_compiled_blocks_trace_whole_and_match_eager(policy):
    """block.compile(fullgraph=True): no graph break, the checkpoint policy traced inside."""
    torch.manual_seed(0)
    eager = Llama(ModelConfig(**SMALL))
    compiled = Llama(ModelConfig(**SMALL, activation_checkpointing=policy))
    compiled.load_state_dict(eager.state_dict())
    for block in compiled.layers:
        block.compile(fullgraph=True)
    tokens = torch.randint(0, 211, (2, 32))
    try:
        ref_loss, ref = _grads(eager, tokens, tokens.roll(-1, 1))
        loss, grads = _grads(compiled, tokens, tokens.roll(-1, 1))
    finally:
        torch._dynamo.reset()
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    for name, g in ref.items():
        torch.testing.assert_close(grads[name], g, rtol=1e-4, atol=1e-6, msg=name)


# ------------------------------------------------------------------- torchtitan on older torch
def _old_create_block_mask(mask_mod, B, H, Q_LEN, KV_LEN, device=None, BLOCK_SIZE=128, _compile=False):
    """torch 2.11's signature: no separate_full_blocks (it always separates the full blocks)."""
    raise AssertionError("signature only")


def test_compat_shim_drops_only_an_argument_the_installed_torch_lacks():
    import types

    from sparsetron.benchmarks.dense_speed import torchtitan_compat_shims

    calls = []
    old_style = types.SimpleNamespace(_compiled_create_block_mask=lambda *a, **kw: calls.append((a, kw)) or "mask")
    shims = torchtitan_compat_shims(old_style, create_block_mask=_old_create_block_mask)
    assert len(shims) == 1 and "separate_full_blocks" in shims[0]
    mask = old_style._compiled_create_block_mask("mod", 2, None, 64, 64, device="cpu", separate_full_blocks=True)
    assert mask == "mask"
    assert calls == [(("mod", 2, None, 64, 64), {"device": "cpu"})]
    with pytest.raises(TypeError, match="separate_full_blocks"):  # False cannot be emulated: refuse
        old_style._compiled_create_block_mask("mod", 2, None, 64, 64, separate_full_blocks=False)
    assert torchtitan_compat_shims(old_style) is shims  # once per module, the same record every call

    def new_create_block_mask(mask_mod, B, H, Q_LEN, KV_LEN, device=None, BLOCK_SIZE=128, _compile=False,
                              separate_full_blocks=True):
        raise AssertionError("not called")

    original = object()
    new_style = types.SimpleNamespace(_compiled_create_block_mask=original)
    assert torchtitan_compat_shims(new_style, create_block_mask=new_create_block_mask) == []
    assert new_style._compiled_create_block_mask is original  # a torch that has the argument: untouched


_TITAN_ON_OLD_TORCH = r"""
import json, sys, torch
import torch.nn.attention.flex_attention as fa
real = fa.create_block_mask

def old_create_block_mask(mask_mod, B, H, Q_LEN, KV_LEN, device=None, BLOCK_SIZE=128, _compile=False):
    return real(mask_mod, B, H, Q_LEN, KV_LEN, device=device, BLOCK_SIZE=BLOCK_SIZE, _compile=_compile)

fa.create_block_mask = old_create_block_mask  # torch 2.11's signature, before torchtitan imports it
from sparsetron.benchmarks.dense_speed import MODEL_TINY, build_torchtitan
out = {}
hidden = {}
for attention in ("flex", "sdpa"):
    model, step, info = build_torchtitan(MODEL_TINY, 64, torch.device("cpu"), "fsdp", compile_blocks=False,
                                         attention=attention)
    tokens = torch.randint(0, MODEL_TINY["vocab_size"], (2, 64), generator=torch.Generator().manual_seed(0))
    positions = torch.arange(64).expand(2, -1)
    with torch.no_grad():  # FlexAttention has no CPU backward: the forward is what CPU can check
        masks = model.get_attention_masks(positions) if attention == "flex" else None
        hidden[attention] = model(tokens, positions, masks)
    out[attention] = info
out["max_abs_diff"] = (hidden["flex"] - hidden["sdpa"]).abs().max().item()
out["scale"] = hidden["sdpa"].abs().max().item()
print("RESULT" + json.dumps(out))
"""


def test_torchtitan_flex_anchor_runs_on_a_torch_without_separate_full_blocks():
    """The GPU image's failure (torch 2.11: create_block_mask() got an unexpected keyword argument
    'separate_full_blocks') reproduced on this torch by installing 2.11's signature; with the shim
    torchtitan's FlexAttention model runs, and equals the modified SDPA anchor (same weights)."""
    pytest.importorskip("torchtitan", reason="torchtitan 0.3.0 is not in the CI venv (GPU runs install .whl)")
    import os
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", _TITAN_ON_OLD_TORCH], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.split("RESULT", 1)[1])
    assert len(out["flex"]["compat_shims"]) == 1 and "separate_full_blocks" in out["flex"]["compat_shims"][0]
    assert out["sdpa"]["modified_anchor"] and not out["flex"]["modified_anchor"]
    assert out["max_abs_diff"] <= 1e-4 * out["scale"], out


def test_titan_anchor_falls_back_to_autocast_then_sdpa_and_records_every_attempt(monkeypatch):
    """FSDP2's mixed precision failed in torch 2.11's step on an H200: the anchor then retries the same
    model under autocast, and only then the SDPA attention; the first attempt that trains ends it."""
    import types

    from sparsetron.benchmarks import dense_speed as ds

    calls = []

    def fake_build(shape, seq, device, precision, compile_blocks, attention="flex"):
        calls.append((attention, precision))
        return precision

    def fake_measure(name, build, vocab, seq, device, args, flops):
        precision = build()
        return {"name": name, **({"error": "RuntimeError: data is not allocated yet"} if precision == "fsdp"
                                 else {"tokens_per_s": 1.0})}

    monkeypatch.setattr(ds, "build_torchtitan", fake_build)
    monkeypatch.setattr(ds, "measure", fake_measure)
    args = types.SimpleNamespace(titan_attention="auto", titan_precision="fsdp")
    out = ds.measure_titan({"vocab_size": 8}, 64, torch.device("cpu"), args, lambda *a: False, 1.0)
    assert calls == [("flex", "fsdp"), ("flex", "autocast")]
    assert [r["name"] for r in out] == ["torchtitan", "torchtitan-autocast"] and "error" in out[0]
    args.titan_precision = "autocast"  # asked for autocast: nothing to fall back to but the attention
    calls.clear()
    assert [r["name"] for r in ds.measure_titan({"vocab_size": 8}, 64, torch.device("cpu"), args,
                                                lambda *a: False, 1.0)] == ["torchtitan"]

import pytest
import torch

from sparsetron.train.sparsity import Sparsifier, SparsityConfig, format_report, sparsity_report, verify_nm


def test_verify_names_the_bad_layer(tiny_llama):
    model = tiny_llama()
    sp = Sparsifier(model, SparsityConfig(n=2, m=4, mode="fixed"))
    with pytest.raises(ValueError, match=r"layers.0.attn.k_proj violates 2:4"):
        verify_nm(model, 2, 4)  # masks not initialised yet: everything dense
    sp.init_masks()
    assert verify_nm(model, 2, 4) == 14
    with pytest.raises(ValueError, match=r"layers.0.attn.k_proj violates 1:4"):
        verify_nm(model, 1, 4)
    mask = model.layers[1].mlp.up_proj.weight_mask
    kept = mask[3, :4].clone()
    mask[3, :4] = True  # a group with 4 kept (the pruned weights are 0 in fixed mode: caught on the mask)
    with pytest.raises(ValueError, match=r"layers.1.mlp.up_proj mask keeps \[2, 4\] of 4, expected exactly 2"):
        verify_nm(model, 2, 4)
    with torch.no_grad():
        model.layers[1].mlp.up_proj.weight[3, :4] = 1.0
    with pytest.raises(ValueError, match=r"layers.1.mlp.up_proj violates 2:4: row 3, inputs 0..3 have 4 nonzeros"):
        verify_nm(model, 2, 4)
    mask[3, :4] = kept
    verify_nm(model, 2, 4)

    sp.finalize()  # plain nn.Linear again: checked through the layer patterns
    with torch.no_grad():
        model.layers[1].attn.o_proj.weight[0, 4:8] = 1.0
    with pytest.raises(ValueError, match=r"layers.1.attn.o_proj violates 2:4: row 0, inputs 4..7"):
        verify_nm(model, 2, 4, layers=SparsityConfig().layers)
    with pytest.raises(ValueError, match="no N:M sparse layer"):
        verify_nm(model, 2, 4)


def test_report_counts(tiny_llama):
    model = tiny_llama(tie_embeddings=True)
    sp = Sparsifier(model, SparsityConfig(n=1, m=4, layers=["*.mlp.*"]))
    sp.init_masks()
    report = sparsity_report(model)
    up = report["layers.0.mlp.up_proj"]
    assert up["pattern"] == "1:4" and up["sparsity"] == pytest.approx(0.75) and up["shape"] == (64, 32)
    assert report["layers.0.attn.q_proj"]["pattern"] == "dense" and report["layers.0.attn.q_proj"]["sparsity"] == 0.0
    assert report["head"]["tied_to"] == "embed"
    table = format_report(report)
    assert "layers.1.mlp.down_proj" in table and "(tied to embed)" in table
    linear_zeros = sum(r["zeros"] for r in report.values() if r["tied_to"] is None)
    total = sum(r["numel"] for r in report.values() if r["tied_to"] is None)
    assert table.splitlines()[-1].strip().endswith(f"{linear_zeros / total:.2%}")
    # SR-STE keeps dense weights, but the report counts what the forward uses
    assert int((model.layers[0].mlp.up_proj.weight == 0).sum()) == 0

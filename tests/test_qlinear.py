"""QuantLinear and the reference kernel against plain float matmul; convert on real models."""
import math

import pytest
import torch
from checkpoint_fixture import tiny_model, token_ids
from torch import nn

from gptq_lab import QuantConfig, UnsupportedModelError, kernels, quantize_model
from gptq_lab.gptq import rtn_result
from gptq_lab.qlinear import CONFIG_ATTR, QuantLinear, convert, infer_config, quant_linears
from gptq_lab.quant import pack_qweight, pack_qzeros

# Tolerances relative to the output's scale: fp32 is exact up to summation order; fp16/bf16
# round the weight and the matmul.
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}


def rtn_layer(k, n, bits, group_size, sym=True, act_order=False, bias=False, seed=0):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=gen)
    result = rtn_result(w, QuantConfig(bits=bits, group_size=group_size, sym=sym))
    if act_order:                                         # a permuted g_idx, as act-order produces
        perm = torch.randperm(k, generator=gen)
        result.codes, result.g_idx = result.codes[:, perm], result.g_idx[perm]
    b = torch.randn(n, generator=gen) if bias else None
    return result, QuantLinear.from_result(result, b)


def reference_output(result, layer, x):
    w = result.scales.half().float()[:, result.g_idx.long()] * (
        result.codes.float() - result.zeros[:, result.g_idx.long()].float())        # [N, K]
    out = x.double() @ w.double().t()
    return out + layer.bias.double() if layer.bias is not None else out


SHAPES = [(32, 32, 2, 32), (64, 96, 3, 32), (128, 64, 4, 128), (96, 32, 4, -1), (64, 64, 8, 16),
          (160, 64, 4, 64)]   # 160 = 2 groups of 64 + one of 32: the short last group


@pytest.mark.parametrize("k,n,bits,group_size", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_forward_equals_dequantized_matmul(k, n, bits, group_size, dtype):
    result, layer = rtn_layer(k, n, bits, group_size, sym=bits != 8, act_order=bits == 3, bias=n == 96)
    x = torch.randn(2, 3, k, generator=torch.Generator().manual_seed(1)).to(dtype)
    y = layer(x)
    assert y.dtype == dtype and y.shape == (2, 3, n)
    expected = reference_output(result, layer, x.reshape(-1, k)).reshape(2, 3, n)
    err = (y.double() - expected).abs().max() / expected.abs().max()
    assert err < TOL[dtype], f"relative error {err:.2e} for {dtype}"


def test_buffers_have_the_checkpoint_layout():
    result, layer = rtn_layer(128, 64, 3, 32, sym=False, bias=True)
    assert layer.qweight.dtype == torch.int32 and layer.qweight.shape == (128 * 3 // 32, 64)
    assert layer.qzeros.dtype == torch.int32 and layer.qzeros.shape == (4, 64 * 3 // 32)
    assert layer.scales.dtype == torch.float16 and layer.scales.shape == (4, 64)
    assert layer.g_idx.dtype == torch.int32 and layer.g_idx.shape == (128,)
    assert layer.bias.dtype == torch.float16
    assert torch.equal(layer.qzeros, pack_qzeros(result.zeros, 3, v1=False))      # true zeros in memory
    assert torch.equal(layer.qweight, pack_qweight(result.codes, 3))


def test_forward_keeps_no_dequantized_weight_unless_asked():
    _, layer = rtn_layer(64, 64, 4, 32)
    x = torch.randn(5, 64)
    y = layer(x)
    assert layer._weight_cache is None
    layer.cache_weight = True
    assert torch.allclose(layer(x), y, atol=1e-6)
    assert layer._weight_cache is not None and layer._weight_cache.shape == (64, 64)
    layer.cache_weight = False
    layer(x)
    assert layer._weight_cache is None


@pytest.mark.parametrize("m", [1, 7, 33])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_kernel_matches_torch_matmul_over_shapes(m, bits):
    k, n = 64 if bits != 3 else 96, 32 * (1 + m % 3)
    result, layer = rtn_layer(k, n, bits, 32, sym=False, act_order=True)
    x = torch.randn(m, k)
    w = kernels.reference.dequantize_gptq(layer.qweight, layer.scales, layer.qzeros, layer.g_idx, bits)   # [K, N]
    assert torch.allclose(w, reference_output(result, layer, torch.eye(k)).float(), atol=1e-6)
    for backend in kernels.available_backends():
        if backend == "triton":            # GPU only here; tests/test_triton.py covers it
            continue
        y = kernels.gptq_matmul(x, layer.qweight, layer.scales, layer.qzeros, layer.g_idx, bits, backend=backend)
        assert torch.allclose(y, torch.matmul(x, w), rtol=1e-5, atol=1e-5)


def test_kernel_errors_name_the_constraint():
    _, layer = rtn_layer(64, 64, 4, 32)
    args = (layer.qweight, layer.scales, layer.qzeros, layer.g_idx, 4)
    with pytest.raises(ValueError, match="x has 32 features but the weight has in_features=64"):
        kernels.gptq_matmul(torch.randn(2, 32), *args)
    with pytest.raises(ValueError, match="qweight must be int32"):
        kernels.gptq_matmul(torch.randn(2, 64), layer.qweight.long(), *args[1:])
    with pytest.raises(ValueError, match=r"qzeros \[G, 8\]"):
        kernels.gptq_matmul(torch.randn(2, 64), layer.qweight, layer.scales, layer.qzeros[:, :4], layer.g_idx, 4)
    with pytest.raises(ValueError, match="backend='marlin' is not available; available: \\['reference'"):
        kernels.gptq_matmul(torch.randn(2, 64), *args, backend="marlin")
    with pytest.raises(ValueError, match="3-bit packing needs in_features and out_features to be multiples of 32; got in_features=48"):
        QuantLinear(48, 64, 3, 16)
    with pytest.raises(ValueError, match="bits=5 is not supported"):
        QuantLinear(64, 64, 5, 32)


@pytest.mark.parametrize("family", ["llama", "opt", "gpt2"])
def test_convert_replaces_linears_and_matches_fake_quant(family):
    model = tiny_model(family)
    config = QuantConfig(bits=4, group_size=32)
    results = quantize_model(model, method="rtn", config=config)
    ids = token_ids()
    fake = model(ids).logits                              # float weights on the grid (fp32 scales)
    float_bytes = sum(model.get_submodule(n).weight.numel() * 4 for n in results)
    convert(model, results, config)
    layers = quant_linears(model)
    assert set(layers) == set(results)
    assert not any(isinstance(model.get_submodule(n), nn.Linear) for n in results)
    packed = sum(b.numel() * b.element_size() for q in layers.values() for b in q.buffers())
    assert packed < float_bytes / 4                       # 4-bit + g32 fp16 scales vs fp32
    assert getattr(model, CONFIG_ATTR) is config
    out = model(ids).logits
    assert (out - fake).abs().max() < 1e-3 * fake.abs().max()   # only the fp16 rounding of scales


def test_convert_refuses_wrong_targets_and_infers_config():
    model = tiny_model("llama")
    results = quantize_model(model, method="rtn", config=QuantConfig(bits=4, group_size=32,
                                                                   overrides={"down_proj": {"bits": 8}}))
    inferred = infer_config(results)
    assert inferred.bits == 4 and inferred.group_size == 32 and not inferred.act_order
    assert inferred.for_module("model.layers.1.mlp.down_proj").bits == 8
    with pytest.raises(UnsupportedModelError, match="not a module of this model"):
        convert(tiny_model("llama"), {"model.layers.9.mlp.up_proj": results["model.layers.0.mlp.up_proj"]})
    with pytest.raises(UnsupportedModelError, match="codes \\[128, 64\\] but the layer is \\[64, 128\\]"):
        convert(tiny_model("llama"), {"model.layers.0.mlp.down_proj": results["model.layers.0.mlp.up_proj"]})
    convert(model, results)
    assert getattr(model, CONFIG_ATTR) == inferred
    with pytest.raises(UnsupportedModelError, match="already a QuantLinear"):
        convert(model, results)


def test_scales_outside_fp16_are_refused():
    result, _ = rtn_layer(32, 32, 4, 32)
    result.scales = result.scales * 1e6
    with pytest.raises(Exception, match="outside the fp16 range"):
        QuantLinear.from_result(result)
    assert math.isfinite(float(result.scales.max()))

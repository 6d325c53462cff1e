"""Conv2d through the transformers quantizer: tiny ResNet / ConvNeXt quantize at load, save, reload, pipeline."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import (
    ConvNextConfig,
    ConvNextForImageClassification,
    ResNetConfig,
    ResNetForImageClassification,
    ViTConfig,
    ViTForImageClassification,
    pipeline,
)

from optimum_splitquant import SplitQuantConfig, quantize_model, size_report
from optimum_splitquant.core import decode_symbols
from optimum_splitquant.edge.split import split_model
from optimum_splitquant.nn import SplitConv2d, SplitQuantConv2d, SplitQuantModule

MODELS = {
    # 3 x 3 convolutions without bias (BatchNorm follows), a 1 x 1 stride-2 shortcut, 7 x 7 stem
    "resnet": (
        ResNetForImageClassification,
        lambda: ResNetConfig(
            num_channels=3, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic", num_labels=3
        ),
    ),
    # 4 x 4 patch stem and depthwise 7 x 7 convolutions with bias, Linear point-wise layers
    "convnext": (
        ConvNextForImageClassification,
        lambda: ConvNextConfig(num_channels=3, hidden_sizes=[8, 16], depths=[1, 1], num_stages=2, num_labels=3),
    ),
}
HEADS = {"resnet": "classifier.1", "convnext": "classifier"}  # ResNet: Sequential(Flatten, Linear)


@pytest.fixture(scope="module")
def float_dirs(tmp_path_factory) -> dict[str, str]:
    out = {}
    for name, (cls, make_config) in MODELS.items():
        torch.manual_seed(0)
        model = cls(make_config())
        with torch.no_grad():  # visible outliers, and non-trivial BatchNorm statistics
            for m in model.modules():
                if isinstance(m, nn.Conv2d):
                    m.weight.view(-1)[::13] *= 6
                if isinstance(m, nn.BatchNorm2d):
                    m.running_mean.normal_(0, 0.1)
                    m.running_var.uniform_(0.5, 1.5)
        path = tmp_path_factory.mktemp(f"float-{name}")
        model.save_pretrained(path)
        out[name] = str(path)
    return out


@pytest.fixture(scope="module")
def pixels() -> torch.Tensor:
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def logits(model: nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(pixel_values=pixels).logits


def convs(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, SplitQuantConv2d))}


@pytest.mark.parametrize("name", list(MODELS))
def test_quantize_at_load_save_reload_bit_identical(name, float_dirs, pixels, tmp_path):
    cls, _ = MODELS[name]
    fp32 = cls.from_pretrained(float_dirs[name]).eval()
    model = cls.from_pretrained(float_dirs[name], quantization_config=SplitQuantConfig(bits=4)).eval()
    quantized_convs = {n: m for n, m in convs(model).items() if isinstance(m, SplitQuantConv2d)}
    assert quantized_convs and set(quantized_convs) == set(convs(fp32)), "every Conv2d is quantized"
    assert isinstance(model.get_submodule(HEADS[name]), nn.Linear)  # the head stays float
    assert model.config.quantization_config.modules_to_not_convert == [HEADS[name]]
    for n, q in quantized_convs.items():
        ref = fp32.get_submodule(n)
        assert (q.kernel_size, q.stride, q.padding, q.groups) == (ref.kernel_size, ref.stride, ref.padding, ref.groups)
        assert (q.bias is None) == (ref.bias is None)
    out = logits(model, pixels)
    ref_out = logits(fp32, pixels)
    assert torch.isfinite(out).all()
    cos = torch.nn.functional.cosine_similarity(out.flatten(), ref_out.flatten(), dim=0)
    assert cos > 0.9, f"4-bit logits drifted from FP32 (cosine {cos:.3f})"

    model.save_pretrained(tmp_path)
    tensors = load_file(str(tmp_path / "model.safetensors"))
    for n, q in quantized_convs.items():
        assert tensors[f"{n}.weight_packed"].dtype == torch.uint8
        assert tensors[f"{n}.weight_packed"].shape == q.weight_packed.shape
        assert f"{n}.weight" not in tensors
    again = cls.from_pretrained(tmp_path).eval()
    assert torch.equal(logits(again, pixels), out)
    assert size_report(again) == size_report(model)
    twin = model.dequantize()
    assert not any(isinstance(m, SplitQuantModule) for m in twin.modules())
    assert torch.equal(logits(twin, pixels), out)


def test_image_classification_pipeline(float_dirs, tmp_path):
    pytest.importorskip("PIL")
    from PIL import Image
    from transformers import ConvNextImageProcessorPil

    processor = ConvNextImageProcessorPil(size={"shortest_edge": 32})
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 48, 3), dtype=np.uint8))
    model = ConvNextForImageClassification.from_pretrained(
        float_dirs["convnext"], quantization_config=SplitQuantConfig(bits=2)
    )
    pipe = pipeline("image-classification", model=model, image_processor=processor)
    preds = pipe(image)
    assert len(preds) == 3 and {p["label"] for p in preds} == {"LABEL_0", "LABEL_1", "LABEL_2"}
    # the same prediction from the saved folder
    model.save_pretrained(tmp_path)
    again = pipeline("image-classification", model=str(tmp_path), image_processor=processor)(image)
    assert again == preds


def test_split_model_agrees_with_quantized_conv_clusters(float_dirs):
    cls, _ = MODELS["convnext"]
    for clustering in ("tensor", "channel"):
        q = cls.from_pretrained(
            float_dirs["convnext"], quantization_config=SplitQuantConfig(bits=2, clustering=clustering)
        )
        s = split_model(cls.from_pretrained(float_dirs["convnext"]), clustering=clustering)
        checked = 0
        for n, layer in q.named_modules():
            if not isinstance(layer, SplitQuantConv2d):
                continue
            split = s.get_submodule(n)
            assert isinstance(split, SplitConv2d)
            ids, _ = decode_symbols(layer.weight_packed, layer.in_features, layer.spec)
            w = split.weight.reshape(layer.out_features, -1)
            nz = w != 0
            assert torch.equal(split.cluster_ids().reshape(layer.out_features, -1)[nz], ids[nz]), n
            checked += 1
        assert checked == sum(isinstance(m, SplitConv2d) for m in s.modules()) == 4


def test_prequantized_conv_shapes_are_checked(float_dirs, tmp_path):
    cls, _ = MODELS["resnet"]
    model = cls.from_pretrained(float_dirs["resnet"], quantization_config=SplitQuantConfig(bits=2))
    model.save_pretrained(tmp_path)
    file = tmp_path / "model.safetensors"
    tensors = load_file(str(file))
    key = "resnet.embedder.embedder.convolution.weight_scale"
    assert tensors[key].shape == (8, 1, 3)  # 8 kernels of 3 * 7 * 7 weights, one range per cluster
    tensors[key] = tensors[key][:, :, :2].contiguous()
    save_file(tensors, str(file), metadata={"format": "pt", "splitquant_format_version": "1"})
    with pytest.raises(ValueError, match=r"Conv2d\(3, 8, kernel_size=\(7, 7\), groups=1\): 8 kernels of 147"):
        cls.from_pretrained(tmp_path)


def test_group_size_must_divide_every_kernel_width(float_dirs):
    cls, _ = MODELS["resnet"]
    # ResNet's stem has 3 * 7 * 7 = 147 weights per kernel: no group of 16 fits
    with pytest.raises((ValueError, RuntimeError), match="group_size"):
        cls.from_pretrained(float_dirs["resnet"], quantization_config=SplitQuantConfig(bits=2, group_size=16))


def tiny_vit() -> ViTForImageClassification:
    """A ViT: one Conv2d patch embedding (4 x 4 patches, stride 4) in front of Linear layers."""
    torch.manual_seed(0)
    config = ViTConfig(
        image_size=32,
        patch_size=4,
        num_channels=3,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        num_labels=3,
    )
    return ViTForImageClassification(config).eval()


@pytest.mark.parametrize("name", [*MODELS, "vit"])
def test_quantize_model_in_memory_quantizes_conv2d_like_load_time(name, float_dirs, pixels, tmp_path):
    """quantize_model on a model with nn.Conv2d gives the layers and bytes of quantizing at load."""
    if name == "vit":
        tiny_vit().save_pretrained(tmp_path / "float")
        cls, folder = ViTForImageClassification, tmp_path / "float"
    else:
        (cls, _), folder = MODELS[name], float_dirs[name]
    config = SplitQuantConfig(bits=4)
    at_load = cls.from_pretrained(folder, quantization_config=config).eval()
    in_memory = quantize_model(cls.from_pretrained(folder).eval(), config)
    loaded_layers = {n: m for n, m in at_load.named_modules() if isinstance(m, SplitQuantModule)}
    memory_layers = {n: m for n, m in in_memory.named_modules() if isinstance(m, SplitQuantModule)}
    assert set(memory_layers) == set(loaded_layers)
    assert any(isinstance(m, SplitQuantConv2d) for m in memory_layers.values()), "the Conv2d layers are quantized"
    for n, layer in memory_layers.items():
        assert type(layer) is type(loaded_layers[n]), n
        for key, value in layer.state_dict().items():
            assert torch.equal(value, loaded_layers[n].state_dict()[key]), f"{n}.{key}"
    assert in_memory.config.quantization_config == at_load.config.quantization_config
    assert torch.equal(logits(in_memory, pixels), logits(at_load, pixels))

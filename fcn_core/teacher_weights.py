"""A trained DeepLabV3-MobileNetV2 TFLite file's weights, read into our FCN over ``mobilenet_v2``.

The TF DeepLab model zoo's mobile models are our ``mobilenet_v2`` backbone layer for layer: the
same MobileNetV2 trunk, then the 1x1 ASPP branch and image pooling, projected to 256 channels,
then a 1x1 classifier, which is exactly an FCN's ``score_fr``. Their quantised TFLite files keep
every convolution as uint8 weights with batch norm folded in, and an int32 bias. So a student can
start as its teacher: ``init_from_deeplab`` dequantises those weights into the student and leaves
the new skips (``score_pool4``, ``score_pool3``) at zero, the paper's staged hand-over, so the
FCN-8s at step 0 predicts what the teacher's network predicts at output stride 32.

Two differences from the teacher remain, and are what training then closes: the teacher runs its
last blocks dilated at output stride 16 (our trunk strides them: the same weights, the atrous
algorithm undone, so the top map is every other one of the teacher's), and it runs in 8 bits.

Batch norm is folded in the file; ``init_from_deeplab`` unfolds it so that training can use it:
each norm gets the mean and variance its input actually has on a few photos, and a scale and
shift that make the unfolded net compute exactly the folded one in evaluation mode, while in
training mode batch statistics land close to those, so the first steps do not undo the start.

Needs the optional ``ai-edge-litert`` runtime (``pip install 'fcn-serve[distill]'``).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from fcn_core.models.backbones import MobileNetV2DeepLab

CONV_OPS = ("CONV_2D", "DEPTHWISE_CONV_2D")
HEAD_LAYERS = ("aspp0", "image_pooling", "concat_projection")
CLASSIFIER = "logits/semantic"


def read_deeplab_convs(path: str | Path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Every convolution of a DeepLab TFLite file, dequantised: layer -> (weight, bias).

    Layers are named as in the model zoo (``MobilenetV2/expanded_conv_3/expand``, ``aspp0``,
    ``logits/semantic``); weights come in PyTorch's layout (out, in / groups, kh, kw).
    """
    try:
        from ai_edge_litert.interpreter import Interpreter, OpResolverType
    except ImportError as exc:  # pragma: no cover - depends on the extra
        raise RuntimeError(
            "reading a TFLite teacher needs ai-edge-litert: pip install 'fcn-serve[distill]'"
        ) from exc
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"teacher model not found: {path}")
    interpreter = Interpreter(
        model_path=str(path),
        experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES,
    )
    interpreter.allocate_tensors()
    details = interpreter.get_tensor_details()

    def dequantised(index: int) -> np.ndarray:
        """Float weights as they are; quantised ones per tensor or per channel."""
        q = details[index]["quantization_parameters"]
        raw = interpreter.get_tensor(index).astype(np.float64)
        if not len(q["scales"]):
            return raw.astype(np.float32)
        shape = [1] * raw.ndim
        if len(q["scales"]) > 1:
            shape[q["quantized_dimension"]] = len(q["scales"])
        scales = np.asarray(q["scales"], dtype=np.float64).reshape(shape)
        zeros = np.asarray(q["zero_points"], dtype=np.float64).reshape(shape)
        return ((raw - zeros) * scales).astype(np.float32)

    convs = {}
    # The op list is the one place the file says which weight and bias belong together; the
    # interpreter offers it only under a private name (present from tflite 2.x to litert 2.3).
    ops = getattr(interpreter, "_get_ops_details", None)
    if ops is None:  # pragma: no cover - depends on the runtime's version
        raise RuntimeError("this ai-edge-litert does not list a model's operators")
    for op in ops():
        if op["op_name"] not in CONV_OPS:
            continue
        _, w_index, b_index = op["inputs"]
        layer = details[w_index]["name"].split(";")[0].rsplit("/", 1)[0]
        weight = dequantised(w_index)
        # TFLite: conv (out, kh, kw, in); depthwise (1, kh, kw, channels)
        order = (3, 0, 1, 2) if op["op_name"] == "DEPTHWISE_CONV_2D" else (0, 3, 1, 2)
        convs[layer] = (
            torch.from_numpy(weight.transpose(order).copy()),
            torch.from_numpy(dequantised(b_index)),
        )
    return convs


def conv_norm_pairs(backbone: MobileNetV2DeepLab) -> dict[str, tuple[nn.Conv2d, nn.BatchNorm2d]]:
    """Our convolutions, each with the batch norm after it, under the model zoo's layer names."""
    pairs: dict[str, tuple[nn.Conv2d, nn.BatchNorm2d]] = {}
    stem = backbone.features[0]
    pairs["MobilenetV2/Conv"] = (stem[0], stem[1])
    for index, block in enumerate(backbone.features[1:], start=1):
        layers = list(block.conv)
        name = "MobilenetV2/expanded_conv" + (f"_{index - 1}" if index > 1 else "")
        stages = ("expand", "depthwise") if len(layers) == 4 else ("depthwise",)
        for stage, seq in zip(stages, layers, strict=False):
            pairs[f"{name}/{stage}"] = (seq[0], seq[1])
        pairs[f"{name}/project"] = (layers[-2], layers[-1])
    for name in HEAD_LAYERS:
        seq = getattr(backbone, name)
        pairs[name] = (seq[0], seq[1])
    return pairs


@torch.no_grad()
def init_from_deeplab(
    model: nn.Module, path: str | Path, photos: Iterable[torch.Tensor]
) -> list[str]:
    """Start an FCN over ``mobilenet_v2`` as the DeepLab TFLite file at ``path``.

    The trunk and the head always; the classifier (``score_fr``) where the file's classes are
    as many as the model's, else it keeps its zeros (a new data set's classes: transfer).
    ``photos``: a few normalised N x 3 x H x W batches, used only to measure what each batch
    norm sees. Returns what was copied, in words. The skips' score layers keep their zeros.
    Raises ``ValueError`` where the file and the model do not fit layer for layer.
    """
    backbone = model.backbone
    if not isinstance(backbone, MobileNetV2DeepLab):
        raise ValueError("initialising from a DeepLab teacher needs --backbone mobilenet_v2")
    convs = read_deeplab_convs(path)
    pairs = conv_norm_pairs(backbone)
    missing = sorted(set(pairs) - set(convs)) + ([CLASSIFIER] if CLASSIFIER not in convs else [])
    if missing:
        raise ValueError(f"{path}: no weights for {', '.join(missing)}")
    for name, (conv, norm) in pairs.items():
        weight, bias = convs[name]
        if weight.shape != conv.weight.shape:
            raise ValueError(
                f"{name}: the file has {tuple(weight.shape)}, the model {tuple(conv.weight.shape)}"
            )
        conv.weight.copy_(weight)
        # folded: the norm adds the bias and nothing else, until it is measured below
        norm.running_mean.zero_()
        norm.running_var.fill_(1 - norm.eps)
        norm.weight.fill_(1)
        norm.bias.copy_(bias)
    copied = [f"{len(pairs)} convolutions of the trunk and head"]
    weight, bias = convs[CLASSIFIER]
    if weight.shape == model.score_fr.weight.shape:
        model.score_fr.weight.copy_(weight)
        model.score_fr.bias.copy_(bias)
        copied.append(f"the classifier ({weight.shape[0]} classes)")
    elif weight.shape[0] == model.score_fr.weight.shape[0]:
        raise ValueError(
            f"{CLASSIFIER}: the file has {tuple(weight.shape)}, "
            f"the model {tuple(model.score_fr.weight.shape)}"
        )
    else:
        copied.append(
            f"not the classifier ({weight.shape[0]} classes, the model's {model.num_classes})"
        )
    measure_norms(model, [norm for _, norm in pairs.values()], photos)
    return copied


@torch.no_grad()
def measure_norms(
    model: nn.Module, norms: list[nn.BatchNorm2d], photos: Iterable[torch.Tensor]
) -> None:
    """Give each folded norm its input's mean and variance, keeping what it computes.

    In evaluation mode each norm is x + bias (folded), so one pass sees every norm's input as
    the teacher's network makes it. With mean m and variance v measured, scale sqrt(v + eps)
    and shift bias + m compute the same x + bias in evaluation mode, and in training mode
    the batch's own statistics, which are near m and v, leave the function nearly as it was.
    """
    parts: dict[nn.BatchNorm2d, list[tuple[int, torch.Tensor, torch.Tensor]]] = {
        n: [] for n in norms
    }

    def record(norm: nn.BatchNorm2d, args: tuple[torch.Tensor, ...]) -> None:
        x = args[0].double()
        dims = (0, 2, 3)
        parts[norm].append((x[:, 0].numel(), x.mean(dims), (x * x).mean(dims)))

    hooks = [norm.register_forward_pre_hook(record) for norm in norms]
    was_training = model.training
    model.eval()
    try:
        seen = 0
        for batch in photos:
            model(batch)
            seen += 1
        if not seen:
            raise ValueError("measuring the batch norms needs at least one batch of photos")
    finally:
        for hook in hooks:
            hook.remove()
        model.train(was_training)
    for norm, measured in parts.items():
        count = sum(n for n, _, _ in measured)
        mean = sum(n * m for n, m, _ in measured) / count
        var = (sum(n * sq for n, _, sq in measured) / count - mean**2).clamp_min(0)
        norm.running_mean.copy_(mean)
        norm.running_var.copy_(var)
        norm.bias.add_(mean.to(norm.bias.dtype))
        norm.weight.copy_((var + norm.eps).sqrt())

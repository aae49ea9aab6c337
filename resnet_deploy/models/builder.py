"""One ResNet builder behind every named variant.

The builder is written against a ``layers`` namespace, so the same code builds the graph with
Keras 3 (``keras``) or Keras 2 (``tf_keras``, which tensorflow-model-optimization needs for QAT
and pruning); layer names are fixed and predictable, so weights transfer between the two by
name-for-name ``set_weights(get_weights())`` and quantization can target layers by name:

    normalize                               pixels 0..255 -> standardised (CIFAR-10 mean/std)
    stem_conv, stem_bn, stem_relu [, stem_pool]
    stage{s}_block{b}_{conv1,bn1,relu1,conv2,bn2[,relu2,conv3,bn3]}
    stage{s}_block{b}_{proj_conv,proj_bn}   projection shortcut where the shape changes
    stage{s}_block{b}_{add,out_relu}
    [post_bn, post_relu]                    pre-activation variants only
    avg_pool, logits                        global average pool, Dense (float32 logits, no softmax)

Shortcuts that change shape use a 1x1 projection (option B of He et al. 2015) everywhere,
including the CIFAR ResNet20..110: it converts to every target and costs 0.5-1 % more parameters
than the zero-padding option A of the paper.
"""

from __future__ import annotations

import math
from types import ModuleType

from resnet_deploy.data.constants import CIFAR10_MEAN, CIFAR10_STD, IMAGE_SHAPE, NUM_CLASSES
from resnet_deploy.errors import ModelError
from resnet_deploy.models.registry import STEMS, ArchSpec, get_arch

BN_MOMENTUM = 0.9  # per-step EMA factor of the moving statistics (Keras convention)
BN_EPSILON = 1e-5


def _framework(framework: str | ModuleType):
    if isinstance(framework, ModuleType):
        return framework
    if framework == "keras":
        import keras

        return keras
    if framework == "tf_keras":
        import tf_keras

        return tf_keras
    raise ModelError(f"Unknown framework {framework!r}.", expected="'keras' (Keras 3) or 'tf_keras' (Keras 2)")


def scaled(channels: int, width: float) -> int:
    return max(1, int(round(channels * width)))


def _validate(spec: ArchSpec, width: float, stem: str, input_shape, num_classes: int) -> tuple[int, int, int]:
    if not (isinstance(width, (int, float)) and 0 < width <= 16 and math.isfinite(width)):
        raise ModelError(f"Width multiplier {width!r} is not usable.", expected="a number in (0, 16], e.g. 0.25 or 1",
                         fix="pass --width 1 for the published sizes")
    if stem not in STEMS:
        raise ModelError(f"Unknown stem {stem!r}.", expected=f"one of {STEMS}")
    if num_classes < 2:
        raise ModelError(f"num_classes={num_classes} is not a classifier.", expected="2 or more")
    try:
        shape = tuple(int(d) for d in input_shape)
    except (TypeError, ValueError):
        shape = ()
    stride = 2 ** (len(spec.blocks_per_stage) - 1) * (4 if stem == "imagenet" else 1)
    if len(shape) != 3 or shape[2] not in (1, 3) or min(shape[:2]) < stride:
        raise ModelError(
            f"Input shape {input_shape!r} does not fit {spec.name} with the {stem} stem.",
            expected=f"(height, width, channels) with channels 1 or 3 and height, width >= {stride} "
                     f"(the network downsamples by {stride}); CIFAR-10 is {IMAGE_SHAPE}",
            fix="use the default input shape (32, 32, 3), or the imagenet stem only for images >= 64 px",
        )
    return shape


def build_model(name: str | ArchSpec, *, width: float = 1.0, stem: str = "cifar", input_shape=IMAGE_SHAPE,
                num_classes: int = NUM_CLASSES, framework: str | ModuleType = "keras", normalize: bool = True,
                weight_decay: float = 0.0, dtype_policy=None):
    """Build a ResNet classifier that takes RGB pixels 0..255 (float32) and returns logits.

    ``framework`` is ``"keras"`` (Keras 3, default) or ``"tf_keras"`` (Keras 2 for tfmot).
    ``normalize`` puts CIFAR-10 mean/std standardisation inside the model as its first layer.
    ``weight_decay`` adds L2 regularisation to conv and dense kernels (0: none). The training recipe
    passes half its weight decay here (coupled L2, as in the SGD papers), see training/recipe.py.
    """
    spec = name if isinstance(name, ArchSpec) else get_arch(name)
    shape = _validate(spec, width, stem, input_shape, num_classes)
    K = _framework(framework)
    L = K.layers
    reg = K.regularizers.L2(weight_decay) if weight_decay else None

    def conv(x, filters, kernel, stride, name):
        return L.Conv2D(filters, kernel, strides=stride, padding="same", use_bias=False,
                        kernel_initializer="he_normal", kernel_regularizer=reg, name=name)(x)

    def bn(x, name):
        return L.BatchNormalization(momentum=BN_MOMENTUM, epsilon=BN_EPSILON, name=name)(x)

    inputs = K.Input(shape=shape, name="image", dtype="float32")
    x = inputs
    if normalize:
        mean, std = CIFAR10_MEAN, CIFAR10_STD
        if shape[2] == 1:
            mean, std = (sum(mean) / 3,), (sum(std) / 3,)
        x = L.Normalization(mean=list(mean), variance=[s * s for s in std], name="normalize")(x)

    stem_width = scaled(spec.stem_width, width)
    if stem == "imagenet":
        x = conv(x, stem_width, 7, 2, "stem_conv")
    else:
        x = conv(x, stem_width, 3, 1, "stem_conv")
    if not spec.preact:
        x = bn(x, "stem_bn")
        x = L.ReLU(name="stem_relu")(x)
    if stem == "imagenet":
        x = L.MaxPooling2D(3, strides=2, padding="same", name="stem_pool")(x)

    in_ch = stem_width
    expansion = 4 if spec.block == "bottleneck" else 1
    for s, (n_blocks, base) in enumerate(zip(spec.blocks_per_stage, spec.widths), start=1):
        planes = scaled(base, width)
        for b in range(1, n_blocks + 1):
            stride = 2 if (b == 1 and s > 1) else 1
            x, in_ch = _block(x, K, spec, f"stage{s}_block{b}", planes, expansion, stride, in_ch, conv, bn)

    if spec.preact:
        x = bn(x, "post_bn")
        x = L.ReLU(name="post_relu")(x)
    x = L.GlobalAveragePooling2D(name="avg_pool")(x)
    outputs = L.Dense(num_classes, kernel_regularizer=reg, dtype="float32", name="logits")(x)
    suffix = "" if width == 1 else f"_w{width:g}".replace(".", "p")
    return K.Model(inputs, outputs, name=f"{spec.name}{suffix}")


def _block(x, K, spec, prefix, planes, expansion, stride, in_ch, conv, bn):
    L = K.layers
    out_ch = planes * expansion
    needs_proj = spec.shortcuts and (stride != 1 or in_ch != out_ch)  # the plain twin has none
    if spec.block == "bottleneck":
        kernels, widths, stride_conv = (1, 3, 1), (planes, planes, out_ch), 2  # stride on the 3x3
    else:
        kernels, widths, stride_conv = (3, 3), (planes, out_ch), 1
    if spec.preact:  # BN-ReLU before each conv; the projection reads the pre-activated input
        y = L.ReLU(name=f"{prefix}_relu0")(bn(x, f"{prefix}_bn0"))
        shortcut = conv(y, out_ch, 1, stride, f"{prefix}_proj_conv") if needs_proj else x
        for i, (k, w) in enumerate(zip(kernels, widths), start=1):
            if i > 1:
                y = L.ReLU(name=f"{prefix}_relu{i - 1}")(bn(y, f"{prefix}_bn{i - 1}"))
            y = conv(y, w, k, stride if i == stride_conv else 1, f"{prefix}_conv{i}")
    else:  # conv-BN-ReLU, the last ReLU after the addition
        shortcut = x
        if needs_proj:
            shortcut = bn(conv(x, out_ch, 1, stride, f"{prefix}_proj_conv"), f"{prefix}_proj_bn")
        y = x
        for i, (k, w) in enumerate(zip(kernels, widths), start=1):
            y = bn(conv(y, w, k, stride if i == stride_conv else 1, f"{prefix}_conv{i}"), f"{prefix}_bn{i}")
            if i < len(kernels):
                y = L.ReLU(name=f"{prefix}_relu{i}")(y)
    if spec.shortcuts:
        y = L.Add(name=f"{prefix}_add")([y, shortcut])
    if not spec.preact:
        y = L.ReLU(name=f"{prefix}_out_relu")(y)
    return y, out_ch


def count_macs(model) -> int:
    """Multiply-accumulates of one forward pass (batch 1): convolutions and dense layers."""
    total = 0
    for layer in model.layers:
        kind = type(layer).__name__
        if kind == "Conv2D":
            out_h, out_w, out_c = layer.output.shape[1:]
            kh, kw = layer.kernel_size
            in_c = layer.input.shape[-1]
            total += int(out_h) * int(out_w) * kh * kw * int(in_c) * int(out_c) // layer.groups
        elif kind == "Dense":
            total += int(layer.input.shape[-1]) * int(layer.units)
    return total


def transfer_weights(src, dst) -> None:
    """Copy weights layer by layer, by name (Keras 3 <-> tf_keras twins).

    Fails loudly, before anything is copied, when the two models do not hold the same weighted layers
    with the same weight shapes: a layer on either side without a twin, or a shape that differs."""
    fix = "build both models from the same architecture name and options (width, stem, classes)"
    src_w = {l.name: l.get_weights() for l in src.layers if l.get_weights()}
    dst_layers = {l.name: l for l in dst.layers if l.get_weights()}
    for side, names, other in ((src.name, src_w, dst_layers), (dst.name, dst_layers, src_w)):
        lonely = [n for n in names if n not in other]
        if lonely:
            raise ModelError(f"Layer(s) {', '.join(map(repr, lonely[:5]))} of {side} have no twin in "
                             f"{dst.name if side == src.name else src.name}.", fix=fix)
    for name, weights in src_w.items():
        want = [tuple(w.shape) for w in dst_layers[name].get_weights()]
        got = [tuple(w.shape) for w in weights]
        if want != got:
            raise ModelError(f"Layer {name!r}: weight shapes {got} in {src.name} but {want} in {dst.name}.",
                             fix=fix)
    for name, weights in src_w.items():
        dst_layers[name].set_weights(weights)

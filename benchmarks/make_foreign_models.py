"""Foreign test models: small CIFAR-10 classifiers written the way their authors would, not with our builder.

Each is built with ``tf_keras`` (Keras 2) in the style of public CIFAR-10 Keras code, with Keras' default
layer names (``conv2d``, ``conv2d_1``, ..., ``dense``; every model starts from a cleared session so the
counters restart), a softmax head, and the author's own input convention; trained for a few epochs on
real CIFAR-10 and saved as a Keras 2 ``.h5`` file (``model.save(path)``), which is what users bring:

==================  ==================================================================  ===================
file                what it is                                                          input (export flags)
==================  ==================================================================  ===================
resnet8.h5          ResNet8 of the MLPerf Tiny / EEMBC style: 3 stacks of one basic     raw pixels 0..255
                    block (16/32/64), 1x1 conv shortcuts made *after* the block's        (none)
                    convolutions, L2 1e-4, softmax; 78,666 parameters
resnet20.h5         ResNet20 v1 of the Keras examples (``resnet_layer``; 1x1 conv        standardised:
                    shortcuts without BatchNorm) at half width (8/16/32), trained on     ``--mean/--std``
                    per-channel standardised pixels                                     (pixel units)
sequential_cnn.h5   the classic Keras ``Sequential`` CIFAR-10 CNN (conv-conv-pool-       pixels / 255
                    dropout twice, dense, dropout, dense, ``Activation('softmax')``)    (``--input-range 0-1``)
                    at half width
shared_input.h5     one input read by three convolutions (1x1, 3x3, 5x5) concatenated,   raw pixels 0..255
                    with ``Rescaling(1/127.5, offset=-1)`` as its first layer            (none)
resnet8_savedmodel  ``resnet8.h5``'s model saved again as a TF SavedModel folder        raw pixels 0..255
==================  ==================================================================  ===================

    .venv/bin/python benchmarks/make_foreign_models.py --data ../shared/data/cifar10 --out tests/data/foreign

Seeds are fixed (``tf_keras.utils.set_random_seed``), so a rerun gives models of the same quality; the
bytes can differ (TensorFlow's CPU kernels are not bit-deterministic across thread schedules), so
``models.json`` records each file's sha256. Each model's test top-1 is measured after saving, by loading the
saved file back with ``tf_keras`` and running a plain batched loop over the whole test split (not through
resnet-deploy), and written to ``models.json`` with the command, the recipe and the export flags its input
convention needs. The files are not committed: ``tests/test_foreign_models.py`` uses them from
``tests/data/foreign`` or ``$RESNET_DEPLOY_FOREIGN_MODELS`` and skips without them
(``tests/test_int8_mapping.py`` builds foreign-style models inside the test and needs no files).

Needs real CIFAR-10 (``--data``, ``$RESNET_DEPLOY_DATA`` or the project's usual places, read with
``resnet_deploy.data.load_cifar10``); without it the script says so and exits 2.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("RESNET_DEPLOY_NO_DOWNLOAD", "1")

REPO = Path(__file__).resolve().parents[1]
SEED = 0


# ----------------------------------------------------------------------------------------------
# The models, as their authors write them
# ----------------------------------------------------------------------------------------------
def resnet8():
    """ResNet8 in the style of the MLPerf Tiny image-classification reference (``resnet_v1_eembc``)."""
    from tf_keras.layers import Activation, AveragePooling2D, BatchNormalization, Conv2D, Dense, Flatten, Input, add
    from tf_keras.models import Model
    from tf_keras.regularizers import l2

    def conv(filters, kernel=3, strides=1):
        return Conv2D(filters, kernel_size=kernel, strides=strides, padding="same",
                      kernel_initializer="he_normal", kernel_regularizer=l2(1e-4))

    inputs = Input(shape=(32, 32, 3))
    x = conv(16)(inputs)
    x = BatchNormalization()(x)
    x = Activation("relu")(x)
    # first stack: identity shortcut
    y = conv(16)(x)
    y = BatchNormalization()(y)
    y = Activation("relu")(y)
    y = conv(16)(y)
    y = BatchNormalization()(y)
    x = add([x, y])
    x = Activation("relu")(x)
    # second and third stacks: the 1x1 projection is created after the block's two convolutions
    for filters in (32, 64):
        y = conv(filters, strides=2)(x)
        y = BatchNormalization()(y)
        y = Activation("relu")(y)
        y = conv(filters)(y)
        y = BatchNormalization()(y)
        x = conv(filters, kernel=1, strides=2)(x)
        x = add([x, y])
        x = Activation("relu")(x)
    x = AveragePooling2D(pool_size=int(np.amin(x.shape[1:3])))(x)
    y = Flatten()(x)
    outputs = Dense(10, activation="softmax", kernel_initializer="he_normal")(y)
    return Model(inputs=inputs, outputs=outputs)


def resnet20(width: int = 8):
    """ResNet20 v1 of the Keras CIFAR-10 example (``resnet_layer`` / ``resnet_v1``, depth 20), ``width``
    filters in the first stage: the example's 16 makes a 1.1 MB file and costs 4x the compute of 8."""
    from tf_keras.layers import Activation, AveragePooling2D, BatchNormalization, Conv2D, Dense, Flatten, Input, add
    from tf_keras.models import Model
    from tf_keras.regularizers import l2

    def resnet_layer(inputs, num_filters=16, kernel_size=3, strides=1, activation="relu", batch_normalization=True):
        x = Conv2D(num_filters, kernel_size=kernel_size, strides=strides, padding="same",
                   kernel_initializer="he_normal", kernel_regularizer=l2(1e-4))(inputs)
        if batch_normalization:
            x = BatchNormalization()(x)
        if activation is not None:
            x = Activation(activation)(x)
        return x

    num_filters, num_res_blocks = width, 3
    inputs = Input(shape=(32, 32, 3))
    x = resnet_layer(inputs=inputs, num_filters=num_filters)
    for stack in range(3):
        for res_block in range(num_res_blocks):
            strides = 2 if stack > 0 and res_block == 0 else 1
            y = resnet_layer(inputs=x, num_filters=num_filters, strides=strides)
            y = resnet_layer(inputs=y, num_filters=num_filters, activation=None)
            if stack > 0 and res_block == 0:  # linear projection to match the changed dims
                x = resnet_layer(inputs=x, num_filters=num_filters, kernel_size=1, strides=strides,
                                 activation=None, batch_normalization=False)
            x = add([x, y])
            x = Activation("relu")(x)
        num_filters *= 2
    x = AveragePooling2D(pool_size=8)(x)
    y = Flatten()(x)
    outputs = Dense(10, activation="softmax", kernel_initializer="he_normal")(y)
    return Model(inputs=inputs, outputs=outputs)


def sequential_cnn():
    """The classic Keras ``Sequential`` CIFAR-10 CNN (``cifar10_cnn.py``) at half its widths (16, 16, 32, 32) and
    a 64-unit dense layer instead of 512, to stay small and cheap to train."""
    from tf_keras.layers import Activation, Conv2D, Dense, Dropout, Flatten, MaxPooling2D
    from tf_keras.models import Sequential

    model = Sequential()
    model.add(Conv2D(16, (3, 3), padding="same", input_shape=(32, 32, 3)))
    model.add(Activation("relu"))
    model.add(Conv2D(16, (3, 3)))
    model.add(Activation("relu"))
    model.add(MaxPooling2D(pool_size=(2, 2)))
    model.add(Dropout(0.25))
    model.add(Conv2D(32, (3, 3), padding="same"))
    model.add(Activation("relu"))
    model.add(Conv2D(32, (3, 3)))
    model.add(Activation("relu"))
    model.add(MaxPooling2D(pool_size=(2, 2)))
    model.add(Dropout(0.25))
    model.add(Flatten())
    model.add(Dense(64))
    model.add(Activation("relu"))
    model.add(Dropout(0.5))
    model.add(Dense(10))
    model.add(Activation("softmax"))
    return model


def shared_input():
    """One input read by three convolutions side by side (an Inception-style stem), normalisation inside."""
    from tf_keras.layers import (BatchNormalization, Concatenate, Conv2D, Dense, GlobalAveragePooling2D, Input,
                                 MaxPooling2D, ReLU, Rescaling)
    from tf_keras.models import Model

    inputs = Input(shape=(32, 32, 3))
    x = Rescaling(1 / 127.5, offset=-1)(inputs)
    branches = [Conv2D(16, k, padding="same", activation="relu")(x) for k in (1, 3, 5)]
    x = Concatenate()(branches)
    x = MaxPooling2D()(x)
    for filters in (48, 96):
        x = Conv2D(filters, 3, padding="same", use_bias=False)(x)
        x = BatchNormalization()(x)
        x = ReLU()(x)
        x = MaxPooling2D()(x)
    x = GlobalAveragePooling2D()(x)
    outputs = Dense(10, activation="softmax")(x)
    return Model(inputs, outputs)


# name -> builder, input convention, epochs, peak learning rate, training images (default: all), export flags.
# Few epochs: the machine that made them had a small share of 2 busy cores (3 CPU-minutes per ResNet8 epoch).
RECIPES = {
    "resnet8": dict(build=resnet8, inputs="pixels", epochs=4, lr=2e-3, export_flags=[]),
    "resnet20": dict(build=resnet20, inputs="standardised", epochs=4, lr=2e-3, export_flags=None),  # set from data
    "sequential_cnn": dict(build=sequential_cnn, inputs="unit", epochs=5, lr=2e-3, train_images=20000,
                           export_flags=["--input-range", "0-1"]),
    "shared_input": dict(build=shared_input, inputs="pixels", epochs=4, lr=2e-3, train_images=20000, export_flags=[]),
}


# ----------------------------------------------------------------------------------------------
# Training and measuring, as a plain script would
# ----------------------------------------------------------------------------------------------
def author_input(x_uint8: np.ndarray, convention: str, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """What the author feeds the model: raw pixels, pixels / 255, or per-channel standardised pixels."""
    x = x_uint8.astype(np.float32)
    if convention == "unit":
        return x / 255.0
    if convention == "standardised":
        return (x - mean) / std
    return x


def dataset(x: np.ndarray, y: np.ndarray, batch: int, seed: int):
    """Shuffled batches with random horizontal flips (a few epochs: no crops, which slow early learning)."""
    import tensorflow as tf

    def augment(img, label):
        return tf.image.random_flip_left_right(img, seed=seed), label

    return (tf.data.Dataset.from_tensor_slices((x, y)).shuffle(len(x), seed=seed, reshuffle_each_iteration=True)
            .map(augment, num_parallel_calls=2).batch(batch).prefetch(2))


class Progress:
    """A line every ``every`` batches: loss, accuracy so far, this process's CPU seconds (the machine is shared)."""

    def __new__(cls, every: int = 50):
        import tf_keras

        class _Progress(tf_keras.callbacks.Callback):
            def on_epoch_begin(self, epoch, logs=None):
                self.epoch = epoch

            def on_train_batch_end(self, batch, logs=None):
                if batch % every == 0:
                    print(f"    epoch {self.epoch + 1} batch {batch}: loss {logs['loss']:.3f} acc {logs['accuracy']:.3f} "
                          f"(cpu {time.process_time():.0f} s)", flush=True)

        return _Progress()


def plain_top1(model, x: np.ndarray, y: np.ndarray, batch: int = 500) -> float:
    correct = 0
    for i in range(0, len(x), batch):
        correct += int((np.asarray(model(x[i:i + batch], training=False)).argmax(1) == y[i:i + batch]).sum())
    return correct / len(x)


def sha256(path: Path) -> str:
    if path.is_dir():
        h = hashlib.sha256()
        for p in sorted(q for q in path.rglob("*") if q.is_file()):
            h.update(p.relative_to(path).as_posix().encode() + b"\0" + p.read_bytes())
        return h.hexdigest()
    return hashlib.sha256(path.read_bytes()).hexdigest()


def size_of(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else path.stat().st_size


def train_one(name: str, recipe: dict, data, out: Path, mean, std, batch: int, epochs: int | None,
              train_images: int | None) -> dict:
    import tf_keras

    tf_keras.backend.clear_session()  # default names restart at conv2d, dense
    tf_keras.utils.set_random_seed(SEED)
    model = recipe["build"]()
    epochs = epochs or recipe["epochs"]
    train_images = train_images or recipe.get("train_images")
    keep = np.arange(len(data.train.y))
    if train_images and train_images < len(keep):  # a seeded class-balanced subset
        from resnet_deploy.data import class_balanced_indices

        keep = class_balanced_indices(data.train.y, train_images, seed=SEED)
    x_train = author_input(data.train.x[keep], recipe["inputs"], mean, std)
    y_train = data.train.y[keep].astype(np.int64)
    x_test = author_input(data.test.x, recipe["inputs"], mean, std)
    steps = int(np.ceil(len(x_train) / batch)) * epochs
    lr = tf_keras.optimizers.schedules.CosineDecay(recipe["lr"], decay_steps=steps)
    model.compile(optimizer=tf_keras.optimizers.Adam(learning_rate=lr), loss="sparse_categorical_crossentropy",
                  metrics=["accuracy"])
    print(f"{name}: {model.count_params():,} parameters, {epochs} epochs on {len(x_train):,} images", flush=True)
    cpu0 = time.process_time()
    model.fit(dataset(x_train, y_train, batch, SEED), epochs=epochs, verbose=2, callbacks=[Progress()])
    path = out / f"{name}.h5"
    tmp = out / f".{name}.tmp.h5"
    model.save(tmp, include_optimizer=False)  # Keras 2 HDF5, the format of most published CIFAR-10 Keras models
    tmp.replace(path)
    loaded = tf_keras.models.load_model(path)
    top1 = plain_top1(loaded, x_test, data.test.y)
    print(f"{name}: test top-1 {100 * top1:.2f} % on {len(x_test):,} images (saved file, plain loop)", flush=True)
    return {"file": path.name, "format": "Keras 2 HDF5 (tf_keras model.save)", "parameters": model.count_params(),
            "layers": [layer.name for layer in loaded.layers], "inputs": recipe["inputs"],
            "export_flags": recipe["export_flags"], "epochs": epochs, "batch": batch,
            "optimizer": f"Adam, cosine decay from {recipe['lr']:g}, sparse categorical cross-entropy",
            "augmentation": "random horizontal flip",
            "seed": SEED, "train_images": len(x_train), "train_cpu_seconds": round(time.process_time() - cpu0),
            "test_images": len(x_test), "test_top1": round(top1, 4), "bytes": size_of(path), "sha256": sha256(path)}


def save_as_saved_model(src: Path, dest: Path, data, convention: str, mean, std) -> dict:
    """``src`` (.h5) loaded with tf_keras and saved again as a TF SavedModel folder."""
    import tf_keras

    tf_keras.backend.clear_session()
    model = tf_keras.models.load_model(src)
    tmp = dest.with_name(f".{dest.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save(tmp, save_format="tf", include_optimizer=False)
    shutil.rmtree(dest, ignore_errors=True)
    tmp.replace(dest)
    import tensorflow as tf

    fn = tf.saved_model.load(str(dest)).signatures["serving_default"]
    x_test = author_input(data.test.x, convention, mean, std)
    correct = 0
    for i in range(0, len(x_test), 500):
        out = fn(tf.constant(x_test[i:i + 500]))
        correct += int((np.asarray(next(iter(out.values()))).argmax(1) == data.test.y[i:i + 500]).sum())
    top1 = correct / len(x_test)
    print(f"{dest.name}: test top-1 {100 * top1:.2f} % (serving_default signature, plain loop)", flush=True)
    return {"file": dest.name, "format": "TF SavedModel folder (tf_keras model.save(save_format='tf'))",
            "from": src.name, "parameters": model.count_params(), "inputs": convention,
            "test_images": len(x_test), "test_top1": round(top1, 4), "bytes": size_of(dest), "sha256": sha256(dest)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=None, help="CIFAR-10 (default: $RESNET_DEPLOY_DATA or the usual places)")
    ap.add_argument("--out", type=Path, default=REPO / "tests" / "data" / "foreign")
    ap.add_argument("--models", default=",".join(RECIPES), help="which to make, comma-separated")
    ap.add_argument("--epochs", type=int, default=None, help="override every recipe's epochs")
    ap.add_argument("--train-images", type=int, default=None, help="override every recipe's training images")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--no-saved-model", action="store_true", help="skip resnet8_savedmodel")
    args = ap.parse_args()

    sys.path.insert(0, str(REPO))
    from resnet_deploy.data import load_cifar10
    from resnet_deploy.errors import ResnetDeployError

    names = [n.strip() for n in args.models.split(",") if n.strip()]
    unknown = sorted(set(names) - set(RECIPES))
    if unknown:
        ap.error(f"unknown model(s) {unknown}; choose from {', '.join(RECIPES)}")
    try:
        data = load_cifar10(args.data)
    except ResnetDeployError as exc:
        print(f"make_foreign_models: real CIFAR-10 is needed to train the foreign models and was not found.\n{exc}\n"
              "Pass --data PATH (a folder with train.npz/test.npz, the official cifar-10-batches-py folder or its "
              "tarball).", file=sys.stderr)
        return 2
    # The author of the standardised model computes the training set's per-channel statistics (pixel units)
    # and rounds them for the README; the same rounded values are what the user passes to --mean/--std.
    flat = data.train.x.reshape(-1, 3).astype(np.float64)
    mean = np.round(flat.mean(0), 1).astype(np.float32)
    std = np.round(flat.std(0), 1).astype(np.float32)
    RECIPES["resnet20"]["export_flags"] = ["--mean", ",".join(f"{v:.1f}" for v in mean),
                                           "--std", ",".join(f"{v:.1f}" for v in std)]
    args.out.mkdir(parents=True, exist_ok=True)
    index_path = args.out / "models.json"
    index = json.loads(index_path.read_text()) if index_path.exists() else {}
    command = "python benchmarks/make_foreign_models.py " + " ".join(sys.argv[1:])
    for name in names:
        rec = train_one(name, RECIPES[name], data, args.out, mean, std, args.batch, args.epochs, args.train_images)
        rec["command"] = command
        index[name] = rec
        if name == "resnet8" and not args.no_saved_model:
            sm = save_as_saved_model(args.out / "resnet8.h5", args.out / "resnet8_savedmodel", data, "pixels", mean, std)
            sm["export_flags"] = []
            sm["command"] = command
            index["resnet8_savedmodel"] = sm
        index_path.write_text(json.dumps(index, indent=1) + "\n")
    print(json.dumps({k: (v["test_top1"], v["bytes"]) for k, v in index.items()}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""A real, trained classifier for accuracy checks: a small CNN on scikit-learn's digits data set.

The zoo's networks have seeded random weights, so their "accuracy" means nothing; int8 acceptance needs a
model whose held-out accuracy is a real number to lose. The digits set (1797 8x8 images, 10 classes)
ships inside scikit-learn (no download) and a small CNN learns it to > 95 % in seconds on one core, so the
model is trained at test time and nothing is cached on disk.
"""

from __future__ import annotations

import io
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx

from pipeline.errors import UserError

log = logging.getLogger(__name__)

CLASSES = 10
IMAGE = 8
OPSET = 17


@dataclass
class DigitsData:
    """Images float32 NCHW [n, 1, 8, 8] in [0, 1]; labels int64 [n]."""

    train_x: np.ndarray
    train_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray


def load_digits_split(seed: int = 0, test_fraction: float = 0.25) -> DigitsData:
    """The digits set split train/test, stratified by class and seeded (same seed, same split)."""
    if not 0.0 < test_fraction < 1.0:
        raise UserError(f"test_fraction must be in (0, 1), got {test_fraction}")
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    # Pixels are 0..16 counts; /16 puts them in [0, 1], the range int8 calibration will see.
    images = (digits.images / 16.0).astype(np.float32)[:, None, :, :]
    labels = digits.target.astype(np.int64)
    train_x, test_x, train_y, test_y = train_test_split(
        images, labels, test_size=test_fraction, random_state=seed, stratify=labels)
    return DigitsData(np.ascontiguousarray(train_x), train_y, np.ascontiguousarray(test_x), test_y)


def _build_cnn():
    from torch import nn

    # Conv -> BN -> ReLU on the first block on purpose: the exported graph keeps the
    # BatchNormalization node (see the export below), so the pipeline's Conv+BN fold is exercised.
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
        nn.MaxPool2d(2),                                  # 8x8 -> 4x4
        nn.Conv2d(32, 32, 3), nn.BatchNorm2d(32), nn.ReLU(),  # 4x4 -> 2x2
        nn.Flatten(),
        nn.Linear(32 * 2 * 2, CLASSES),
    )


def train_digits_cnn(data: DigitsData, seed: int = 0, epochs: int = 12, batch: int = 32,
                     export_batch: int = 1) -> onnx.ModelProto:
    """Train the small CNN on `data.train_*` (torch, CPU, seeded) and return it as ONNX.

    The ONNX model has one input "input" [export_batch, 1, 8, 8] float32 and one output "logits"
    [export_batch, 10], opset 17, no dynamic axes (the pipeline compiles for a fixed shape).
    """
    if epochs < 1 or batch < 1 or export_batch < 1:
        raise UserError(f"epochs, batch and export_batch must be >= 1 (got {epochs}, {batch}, {export_batch})")
    import torch

    # One thread: bit-for-bit reproducible training, and the model is too small to gain from more.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(seed)
        model = _build_cnn()
        start = time.perf_counter()
        _fit(model, data, seed, epochs, batch)
        log.info("digits CNN trained in %.1f s (%d epochs)", time.perf_counter() - start, epochs)
        return _export(model, export_batch)
    finally:
        torch.set_num_threads(threads)


def _fit(model, data: DigitsData, seed: int, epochs: int, batch: int) -> None:
    import torch

    x = torch.from_numpy(data.train_x)
    y = torch.from_numpy(data.train_y)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=1e-2, total_steps=epochs * ((len(x) + batch - 1) // batch))
    loss_fn = torch.nn.CrossEntropyLoss()
    # A generator of its own so the shuffles do not depend on (or disturb) the global RNG state.
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=gen)
        for i in range(0, len(x), batch):
            idx = order[i:i + batch]
            optimizer.zero_grad()
            loss_fn(model(x[idx]), y[idx]).backward()
            optimizer.step()
            scheduler.step()
    model.eval()


def _export(model, export_batch: int) -> onnx.ModelProto:
    import torch

    buf = io.BytesIO()
    with torch.no_grad():
        # TorchScript exporter (dynamo=False): the dynamo one needs onnxscript, which is not a
        # dependency. PRESERVE on an eval-mode model exports inference BN but skips the exporter's
        # Conv+BN fusion, so the graph keeps a BatchNormalization node for the pipeline to fold.
        torch.onnx.export(
            model, (torch.zeros(export_batch, 1, IMAGE, IMAGE),), buf,
            input_names=["input"], output_names=["logits"], opset_version=OPSET,
            training=torch.onnx.TrainingMode.PRESERVE, do_constant_folding=False, dynamo=False)
    proto = onnx.load_from_string(buf.getvalue())
    onnx.checker.check_model(proto, full_check=True)
    return proto


def digits_accuracy(predict: Callable[[np.ndarray], np.ndarray], data: DigitsData, batch: int) -> float:
    """Top-1 accuracy on the held-out split. `predict` maps a [batch, 1, 8, 8] float32 array to logits
    [batch, 10]; the last partial batch is zero-padded to `batch` and the padded rows are dropped."""
    if batch < 1:
        raise UserError(f"batch must be >= 1, got {batch}")
    n = len(data.test_x)
    correct = 0
    for start in range(0, n, batch):
        chunk = data.test_x[start:start + batch]
        rows = len(chunk)
        if rows < batch:
            pad = np.zeros((batch - rows, *chunk.shape[1:]), chunk.dtype)
            chunk = np.concatenate([chunk, pad])
        logits = np.asarray(predict(chunk))
        if logits.shape[0] != batch:
            raise ValueError(f"predict returned {logits.shape[0]} rows for a batch of {batch}")
        correct += int((logits[:rows].argmax(axis=-1) == data.test_y[start:start + rows]).sum())
    return correct / n

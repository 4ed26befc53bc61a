"""The training loop: augmentation, precision, optimiser and schedule, checkpoints, early stop.

Everything here works on torch modules and datasets; :mod:`training.run` wires it to the
dataset layouts, the run folder and the model registry.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, WeightedRandomSampler
from tqdm import tqdm

from inference.networks import MetadataFusion
from inference.preprocessing import PreprocessSpec
from inference.torchvision_compat import import_torchvision

Item = tuple[torch.Tensor, torch.Tensor, int]


# --- augmentation ---------------------------------------------------------------------------------


class RandomLetterbox(nn.Module):
    """Squeeze the rows by a random factor and pad with black, keeping the input size.

    Sets whose images were resized to a square without keeping the aspect ratio (Kermany's
    224x224 set) would otherwise never show the model the letterboxed input that production
    preprocessing gives a landscape radiograph.
    """

    def __init__(self, max_aspect: float, fill: float, p: float = 0.5) -> None:
        super().__init__()
        self.max_aspect, self.fill, self.p = max_aspect, fill, p

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        if random.random() >= self.p:
            return image
        height = image.shape[-2]
        rows = max(1, round(height / random.uniform(1.0, self.max_aspect)))
        squeezed = nn.functional.interpolate(
            image.unsqueeze(0), size=(rows, image.shape[-1]), mode="bilinear", antialias=True
        )[0]
        out = torch.full_like(image, self.fill)
        top = (height - rows) // 2
        out[..., top : top + rows, :] = squeezed
        return out


def augmentation(spec: PreprocessSpec, *, letterbox_aspect: float) -> Callable[..., Any]:
    """Random resized crop and random affine, in-plane (a CT volume's slices move together)."""
    import_torchvision()
    from torchvision.transforms import v2

    size = list(spec.size[-2:])
    fill = -spec.mean / spec.std  # black after normalisation, as the letterbox pads
    steps: list[Callable[..., Any]] = []
    if spec.dims == 2 and letterbox_aspect > 1:
        steps.append(RandomLetterbox(letterbox_aspect, fill))
    steps += [
        v2.RandomResizedCrop(size, scale=(0.75, 1.0), ratio=(0.85, 1.18), antialias=True),
        v2.RandomAffine(degrees=10, translate=(0.06, 0.06), scale=(0.9, 1.1), fill=fill),
    ]
    compose: Callable[..., Any] = v2.Compose(steps)
    if spec.dims == 2:
        return compose
    return lambda volume: compose(volume[0]).unsqueeze(0)


class Augmented(Dataset[Item]):
    def __init__(self, base: Dataset[Item], transform: Callable[..., Any]):
        self.base, self.transform = base, transform

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, item: int) -> Item:
        pixels, metadata, target = self.base[item]
        return self.transform(pixels), metadata, target


# --- precision and seeds --------------------------------------------------------------------------


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python, numpy and torch; deterministic cuDNN. The generator feeds the loaders."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    return torch.Generator().manual_seed(seed)


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto``: fp16 AMP on CUDA; bf16 on CPUs with native bf16 (AVX512-BF16, AMX); else fp32."""
    if precision != "auto":
        if precision == "fp16" and device.type != "cuda":
            raise ValueError("fp16 needs CUDA; use bf16 or fp32 on CPU")
        return precision
    if device.type == "cuda":
        return "fp16"
    native_bf16 = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    return "bf16" if native_bf16 else "fp32"


def autocast(precision: str, device: torch.device) -> AbstractContextManager[Any]:
    if precision == "fp32":
        return nullcontext()
    dtype = torch.float16 if precision == "fp16" else torch.bfloat16
    return torch.autocast(device.type, dtype=dtype)


# --- loop -----------------------------------------------------------------------------------------


@dataclass
class FitConfig:
    epochs: int = 20
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 1e-4
    warmup_epochs: float = 1.0
    patience: int = 5
    balance: str = "sampler"  # sampler | weights | none
    freeze_epochs: int = 0
    workers: int = 0
    precision: str = "auto"


@dataclass
class History:
    """Per-epoch records and the best epoch so far; saved in every checkpoint."""

    epochs: list[dict[str, Any]] = field(default_factory=list)
    best_epoch: int = 0
    best_score: float = -math.inf

    @property
    def stale(self) -> int:
        return len(self.epochs) - self.best_epoch


def class_weights(targets: list[int], classes: int) -> torch.Tensor:
    """Inverse class frequency, normalised to mean 1 (the binary case's ``pos_weight``)."""
    counts = np.bincount(targets, minlength=classes).astype(np.float64)
    weights = counts.sum() / np.maximum(counts, 1) / classes
    return torch.tensor(weights, dtype=torch.float32)


def train_loader(
    dataset: Dataset[Item],
    targets: list[int],
    classes: int,
    config: FitConfig,
    generator: torch.Generator,
) -> DataLoader[Item]:
    """Shuffled batches; with ``balance="sampler"`` every class is drawn equally often."""
    sampler = None
    if config.balance == "sampler":
        per_sample = class_weights(targets, classes)[targets].tolist()
        sampler = WeightedRandomSampler(per_sample, len(targets), generator=generator)
    return DataLoader(
        dataset,
        batch_size=config.batch_size,
        shuffle=sampler is None,
        sampler=sampler,
        generator=generator,
        num_workers=config.workers,
        drop_last=len(targets) > config.batch_size,
    )


def warmup_cosine(total_steps: int, warmup_steps: int) -> Callable[[int], float]:
    """Learning-rate factor: linear warm-up to 1, then cosine down to 0 at ``total_steps``."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def set_backbone_trainable(model: nn.Module, trainable: bool) -> None:
    """Freeze or unfreeze everything but the head (``fc``, and the metadata embedding)."""
    for name, parameter in model.named_parameters():
        parameter.requires_grad = trainable or name.startswith(("fc.", "metadata."))


def load_pretrained(model: nn.Module, path: Path) -> list[str]:
    """Load a local torchvision state_dict; 3-channel stems are summed to one channel.

    Tensors whose shape does not fit (the classifier of another class count) are skipped and
    their names returned. Nothing is downloaded.
    """
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(model, MetadataFusion):
        model = model.backbone
    own = model.state_dict()
    skipped = []
    for name, tensor in state.items():
        if (
            name in own
            and tensor.dim() in (4, 5)
            and tensor.shape[1] == 3
            and own[name].shape[1] == 1
        ):
            tensor = tensor.sum(dim=1, keepdim=True)
        if name not in own or own[name].shape != tensor.shape:
            skipped.append(name)
            continue
        own[name] = tensor
    model.load_state_dict(own)
    return skipped


class Trainer:
    """One model's optimiser, schedule, precision and history; checkpoints hold all of it."""

    def __init__(
        self,
        model: nn.Module,
        config: FitConfig,
        device: torch.device,
        steps_per_epoch: int,
        loss_weights: torch.Tensor | None,
    ) -> None:
        self.model = model.to(device)
        self.config, self.device = config, device
        self.precision = resolve_precision(config.precision, device)
        self.optimizer = torch.optim.AdamW(
            model.parameters(), lr=config.lr, weight_decay=config.weight_decay
        )
        total = config.epochs * steps_per_epoch
        warmup = max(1, round(config.warmup_epochs * steps_per_epoch))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, warmup_cosine(total, warmup)
        )
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.precision == "fp16")
        self.loss = nn.CrossEntropyLoss(
            weight=None if loss_weights is None else loss_weights.to(device)
        )
        self.history = History()

    def train_epoch(self, loader: DataLoader[Any], epoch: int) -> float:
        """One pass over ``loader``; the mean training loss."""
        set_backbone_trainable(self.model, epoch > self.config.freeze_epochs)
        self.model.train()
        total, count = 0.0, 0
        batches = tqdm(loader, desc=f"epoch {epoch}", leave=False, unit="batch")
        for pixels, metadata, targets in batches:
            targets = targets.to(self.device)
            with autocast(self.precision, self.device):
                logits = forward(self.model, pixels, metadata, self.device)
                loss = self.loss(logits.float(), targets)
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.scheduler.step()
            total += float(loss.detach()) * len(targets)
            count += len(targets)
        return total / max(count, 1)

    def record(self, entry: dict[str, Any], score: float) -> bool:
        """Add an epoch's metrics; True when ``score`` is the best so far."""
        self.history.epochs.append(entry)
        if score > self.history.best_score:
            self.history.best_score = score
            self.history.best_epoch = entry["epoch"]
            return True
        return False

    def checkpoint(self, path: Path) -> None:
        state = {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "history": self.history.__dict__,
            "rng": {
                "python": random.getstate(),
                "numpy": np.random.get_state(),
                "torch": torch.get_rng_state(),
            },
        }
        partial = path.with_suffix(".part")
        torch.save(state, partial)
        partial.replace(path)

    def resume(self, path: Path) -> int:
        """Restore a :meth:`checkpoint`; the number of epochs it had finished."""
        state = torch.load(path, map_location=self.device, weights_only=False)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.history = History(**state["history"])
        random.setstate(state["rng"]["python"])
        np.random.set_state(state["rng"]["numpy"])
        torch.set_rng_state(state["rng"]["torch"])
        return len(self.history.epochs)


def predict(
    model: nn.Module, loader: DataLoader[Any], device: torch.device, precision: str = "fp32"
) -> tuple[np.ndarray, np.ndarray, float]:
    """Softmax probabilities ``[N, classes]``, targets ``[N]`` and the mean cross-entropy."""
    model.eval()
    probabilities, targets, loss = [], [], 0.0
    with torch.inference_mode():
        for pixels, metadata, batch_targets in tqdm(
            loader, desc="evaluate", leave=False, unit="batch"
        ):
            with autocast(precision, device):
                logits = forward(model, pixels, metadata, device).float()
            loss += float(
                nn.functional.cross_entropy(logits, batch_targets.to(device), reduction="sum")
            )
            probabilities.append(torch.softmax(logits, dim=1).cpu().numpy())
            targets.append(batch_targets.numpy())
    count = sum(len(t) for t in targets)
    return np.concatenate(probabilities), np.concatenate(targets), loss / max(count, 1)


def forward(
    model: nn.Module, pixels: torch.Tensor, metadata: torch.Tensor, device: torch.device
) -> torch.Tensor:
    """The logits of a batch; a metadata-fusion model reads the metadata features too."""
    if isinstance(model, MetadataFusion):
        logits: torch.Tensor = model(pixels.to(device), metadata.to(device))
    else:
        logits = model(pixels.to(device))
    return logits

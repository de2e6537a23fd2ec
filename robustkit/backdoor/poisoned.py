"""``PoisonedDataset``: a dataset with a backdoor implanted in a known subset, saved with a manifest.

The poisoned subset is drawn deterministically from a seed. Dirty-label attacks (BadNets,
Blended, WaNet) poison ``round(rate * N)`` samples whose label is not the target and relabel
them; clean-label attacks (SIG) poison only target-class samples and keep their labels. WaNet's
noise mode additionally warps ``cross_ratio`` times as many other samples with a perturbed
warp and keeps their labels (they are *not* counted as poisoned). ``poisoned_indices`` is the
ground truth for filtering defenses.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from ..errors import DataNotFoundError, InputError
from ..io import atomic_path, atomic_write_json
from ..data.arrays import ArrayDataset, to_tensors
from ..data.npz import save_npz

MANIFEST_VERSION = 1


def _attack_params(attack: Any) -> dict[str, Any]:
    out = {}
    for k, v in vars(attack).items():
        if k.startswith("_"):
            continue
        out[k] = v if isinstance(v, (int, float, str, bool, type(None))) else (list(v) if isinstance(v, (list, tuple)) else repr(v))
    return out


class PoisonedDataset(Dataset):
    """A copy of ``dataset`` in which the samples at ``poisoned_indices`` carry the trigger.

    Args:
        dataset: any dataset of (image, label) pairs (images N x C x H x W in [0, 1]).
        attack: a :class:`~robustkit.base.BackdoorAttack`.
        rate: fraction of the whole dataset to poison (exact: ``round(rate * len(dataset))``).
        seed: seed of the choice of samples (and of WaNet's noise warps).
        num_classes: needed for all-to-all targets (default: inferred from the labels).
    """

    def __init__(self, dataset: Dataset, attack: Any, rate: float = 0.1, seed: int = 0, num_classes: int | None = None):
        if not 0 <= rate <= 1:
            raise InputError(f"poisoning rate must be in [0, 1], got {rate!r}")
        x, y = to_tensors(dataset)
        n = x.shape[0]
        k = int(num_classes or getattr(dataset, "num_classes", 0) or int(y.max()) + 1)
        self.attack, self.rate, self.seed, self.num_classes = attack, float(rate), int(seed), k
        self.classes = list(getattr(dataset, "classes", None) or [str(i) for i in range(k)])
        rng = np.random.default_rng(seed)
        n_poison = int(round(rate * n))
        if attack.clean_label:
            pool = np.flatnonzero(y.numpy() == attack.target)
            if n_poison > len(pool):
                raise InputError(
                    f"clean-label attack can poison only the {len(pool)} target-class samples, but rate {rate} asks for {n_poison}"
                )
        elif attack.all_to_all:
            pool = np.arange(n)
        else:
            pool = np.flatnonzero(y.numpy() != attack.target)
            if n_poison > len(pool):
                raise InputError(f"rate {rate} asks for {n_poison} poisoned samples but only {len(pool)} are not of the target class")
        chosen = np.sort(rng.choice(pool, size=n_poison, replace=False)) if n_poison else np.array([], dtype=np.int64)
        self.poisoned_indices: list[int] = chosen.tolist()
        self.original_labels = y.clone()
        images, labels = x.clone(), y.clone()
        idx = torch.as_tensor(chosen, dtype=torch.long)
        if len(idx):
            images[idx] = attack.apply(x[idx])
            if not attack.clean_label:
                labels[idx] = attack.target_labels(y[idx], k)
        self.noise_indices: list[int] = []
        if getattr(attack, "noise_mode", False) and getattr(attack, "cross_ratio", 0) > 0 and n_poison:
            rest = np.setdiff1d(np.arange(n), chosen)
            n_noise = min(len(rest), int(round(attack.cross_ratio * n_poison)))
            noise = np.sort(rng.choice(rest, size=n_noise, replace=False))
            self.noise_indices = noise.tolist()
            nidx = torch.as_tensor(noise, dtype=torch.long)
            images[nidx] = attack.apply_noise(x[nidx], torch.Generator().manual_seed(seed + 1))
        self.images, self.labels = images, labels
        self.is_poisoned = torch.zeros(n, dtype=torch.bool)
        self.is_poisoned[idx] = True

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.images[i], int(self.labels[i])

    @property
    def channels(self) -> int:
        return self.images.shape[1]

    def as_array_dataset(self) -> ArrayDataset:
        return ArrayDataset(self.images, self.labels, self.classes)

    def manifest(self) -> dict[str, Any]:
        return {
            "format": "robustkit.poisoned",
            "version": MANIFEST_VERSION,
            "attack": getattr(type(self.attack), "registry_name", type(self.attack).__name__),
            "attack_params": _attack_params(self.attack),
            "rate": self.rate,
            "seed": self.seed,
            "num_samples": len(self),
            "num_classes": self.num_classes,
            "classes": self.classes,
            "poisoned_indices": self.poisoned_indices,
            "noise_indices": self.noise_indices,
        }

    def save(self, path: str | Path) -> Path:
        """Write ``path`` (``.npz`` arrays, or a folder of PNGs per class) plus ``manifest.json``.

        For ``.npz`` the manifest is ``<path>.manifest.json``; for a folder it is inside it.
        Every file is written atomically; the manifest, written last, records the data's SHA-256.
        """
        return save_poisoned(self.images, self.labels, self.manifest(), path, self.original_labels)


def save_poisoned(images: torch.Tensor, labels: torch.Tensor, manifest: dict[str, Any], path: str | Path,
                  original_labels: torch.Tensor | None = None) -> Path:
    p = Path(path)
    manifest = dict(manifest)
    if p.suffix == ".npz":
        extra = {"original_labels": original_labels.numpy()} if original_labels is not None else {}
        save_npz(p, images, labels, classes=manifest.get("classes"), **extra)
        manifest["data_file"] = p.name
        manifest["sha256"] = hashlib.sha256(p.read_bytes()).hexdigest()
        atomic_write_json(p.with_name(p.name + ".manifest.json"), manifest)
        return p
    from PIL import Image

    p.mkdir(parents=True, exist_ok=True)
    classes = manifest.get("classes") or [str(i) for i in range(int(labels.max()) + 1)]
    files = []
    arr = (images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    for i, (img, lab) in enumerate(zip(arr, labels.tolist())):
        rel = f"{classes[lab]}/{i:06d}.png"
        (p / classes[lab]).mkdir(exist_ok=True)
        with atomic_path(p / rel, suffix=".png") as tmp:
            Image.fromarray(img[:, :, 0] if img.shape[2] == 1 else img).save(tmp, format="PNG")
        files.append(rel)
    manifest["files"] = files
    atomic_write_json(p / "manifest.json", manifest)
    return p


class LoadedPoisonedDataset(ArrayDataset):
    """A poisoned set read back from disk: an ``ArrayDataset`` plus its manifest and ground truth."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, manifest: dict[str, Any]):
        super().__init__(images, labels, manifest.get("classes"))
        self.manifest = manifest
        self.poisoned_indices: list[int] = list(manifest.get("poisoned_indices", []))
        self.is_poisoned = torch.zeros(len(self), dtype=torch.bool)
        self.is_poisoned[self.poisoned_indices] = True


def load_poisoned(path: str | Path) -> LoadedPoisonedDataset:
    """Read a poisoned set written by :meth:`PoisonedDataset.save` (checks the manifest and hash)."""
    p = Path(path)
    if not p.exists():
        raise DataNotFoundError(f"poisoned dataset not found: {p}")
    if p.is_dir():
        mpath = p / "manifest.json"
        if not mpath.is_file():
            raise DataNotFoundError(f"{p} has no manifest.json (not written by robustkit?)")
        manifest = json.loads(mpath.read_text())
        from PIL import Image

        imgs, labels = [], []
        classes = manifest["classes"]
        for rel in manifest["files"]:
            with Image.open(p / rel) as im:
                a = np.asarray(im)
            imgs.append(a[:, :, None] if a.ndim == 2 else a)
            labels.append(classes.index(rel.split("/")[0]))
        x = torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).float() / 255
        y = torch.tensor(labels)
    else:
        mpath = p.with_name(p.name + ".manifest.json")
        if not mpath.is_file():
            raise DataNotFoundError(f"manifest {mpath} not found beside {p}")
        manifest = json.loads(mpath.read_text())
        digest = hashlib.sha256(p.read_bytes()).hexdigest()
        if manifest.get("sha256") and manifest["sha256"] != digest:
            raise InputError(f"{p} does not match its manifest (sha256 differs): the file was changed or truncated")
        with np.load(p) as f:
            from ..data.npz import images_to_tensor

            x = images_to_tensor(f["x"])
            y = torch.from_numpy(f["y"]).long()
    if manifest.get("format") != "robustkit.poisoned":
        raise InputError(f"{mpath} is not a robustkit poisoned-dataset manifest")
    if len(y) != manifest.get("num_samples", len(y)):
        raise InputError(f"{p} holds {len(y)} samples but its manifest says {manifest['num_samples']}")
    return LoadedPoisonedDataset(x, y, manifest)

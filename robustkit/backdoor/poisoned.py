"""``PoisonedDataset``: a dataset with a backdoor implanted in a known subset, saved with a manifest.

The poisoned subset is drawn deterministically from a seed. Dirty-label attacks (BadNets,
Blended, WaNet) poison ``round(rate * N)`` samples whose label is not the target and relabel
them; clean-label attacks (SIG) poison only target-class samples and keep their labels. Attacks
that declare extra samples (:meth:`~robustkit.base.BackdoorAttack.extra_samples`: WaNet's noise
mode) additionally alter that many other samples with
:meth:`~robustkit.base.BackdoorAttack.apply_extra` and keep their labels (they are listed in
``noise_indices`` and *not* counted as poisoned). ``poisoned_indices`` is the ground truth for
filtering defenses.

The manifest records the attack's :meth:`~robustkit.base.BackdoorAttack.config` (constructor
arguments as plain data, arrays included), so :func:`rebuild_attack` gives back the exact trigger.
"""

from __future__ import annotations

import hashlib
import json
import math
import numbers
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from ..base import BackdoorAttack
from ..errors import DataNotFoundError, InputError
from ..io import atomic_path, atomic_write_json
from ..data.arrays import ArrayDataset, declared_classes, declared_num_classes, to_tensors
from ..data.npz import save_npz
from ..validation import check_target_class

# 2: attack_params is the attack's config() (rebuilds it exactly); folders are named by class index
MANIFEST_VERSION = 2


def resolve_num_classes(dataset: Dataset, y: torch.Tensor, attack: Any, num_classes: int | None, what: str) -> int:
    """The class count for poisoning / measuring ``attack`` on ``dataset`` (labels ``y``).

    ``num_classes`` if given, else the count the dataset declares. Only an all-to-one attack
    may fall back to ``max(label) + 1``: all-to-all maps y -> (y + 1) mod K and a K inferred
    from labels that miss the last classes would be wrong, so it raises instead. Labels and
    the attack's target must lie below the count (:class:`InputError` otherwise).
    """
    declared = declared_num_classes(dataset)
    if num_classes is not None:
        if isinstance(num_classes, bool) or not isinstance(num_classes, numbers.Integral) or num_classes < 2:
            raise InputError(f"num_classes must be an integer >= 2, got {num_classes!r}")
        k = int(num_classes)
    elif declared is not None:
        k = declared
    elif getattr(attack, "all_to_all", False):
        raise InputError(
            f"{what} with an all-to-all attack needs the number of classes: pass num_classes= "
            "(the dataset does not declare its classes and max(label) + 1 may undercount them)"
        )
    else:
        k = int(y.max()) + 1
    if y.numel() and int(y.max()) >= k:
        raise InputError(f"{what}: the data has class index {int(y.max())} but there are only {k} classes")
    if not getattr(attack, "all_to_all", False):
        check_target_class(attack.target, k, f"{type(attack).__name__} target")
    return k


def attack_name(attack: Any) -> str:
    return getattr(type(attack), "registry_name", type(attack).__name__)


def rebuild_attack(manifest: dict[str, Any]) -> Any:
    """The exact attack a manifest was written with (``BACKDOORS.build`` of its name and config)."""
    from ..registry import BACKDOORS
    from .. import backdoor  # noqa: F401  (registers the built-in triggers)

    version = manifest.get("version", 1)
    if not isinstance(version, int) or version < 2:
        raise InputError(
            f"manifest version {version!r} does not record the attack's exact configuration; "
            "poison and save the data again with this robustkit"
        )
    name, params = manifest.get("attack"), manifest.get("attack_params")
    if not isinstance(name, str) or not isinstance(params, dict):
        raise InputError("manifest lacks 'attack' (a name) and 'attack_params' (a mapping)")
    return BACKDOORS.build({"name": name, **params}, "manifest.attack_params")


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
        if isinstance(rate, bool) or not isinstance(rate, numbers.Real) or not (math.isfinite(rate) and 0 <= rate <= 1):
            raise InputError(f"poisoning rate must be in [0, 1], got {rate!r}")
        if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
            raise InputError(f"seed must be an integer >= 0, got {seed!r}")
        if not isinstance(attack, BackdoorAttack):
            raise InputError(f"attack must be a BackdoorAttack (e.g. BadNets()), got {type(attack).__name__}")
        x, y = to_tensors(dataset)
        n = x.shape[0]
        k = resolve_num_classes(dataset, y, attack, num_classes, "poisoning")
        self.attack, self.rate, self.seed, self.num_classes = attack, float(rate), int(seed), k
        classes = declared_classes(dataset)
        if classes is not None and len(classes) != k:
            raise InputError(f"num_classes={k} but the dataset declares {len(classes)} classes")
        self.classes = classes if classes is not None else [str(i) for i in range(k)]
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
        # extra label-kept samples (WaNet's noise mode), disjoint from the poisoned ones
        self.noise_indices: list[int] = []
        n_extra = attack.extra_samples(n_poison) if n_poison else 0
        if isinstance(n_extra, bool) or not isinstance(n_extra, numbers.Integral) or n_extra < 0:
            raise InputError(f"{type(attack).__name__}.extra_samples() must return an integer >= 0, got {n_extra!r}")
        if n_extra > 0:
            rest = np.setdiff1d(np.arange(n), chosen)
            n_extra = min(len(rest), n_extra)
        if n_extra > 0:
            extra = np.sort(rng.choice(rest, size=n_extra, replace=False))
            self.noise_indices = extra.tolist()
            eidx = torch.as_tensor(extra, dtype=torch.long)
            images[eidx] = attack.apply_extra(x[eidx], torch.Generator().manual_seed(seed + 1))
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
            "attack": attack_name(self.attack),
            "attack_params": self.attack.config(),
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

        For ``.npz`` the manifest is ``<path>.manifest.json``; for a folder it is inside it, and
        the class folders are named by class index (``0``, ``1``, ... zero-padded so that they
        sort numerically); the class names are in the manifest. Every file is written
        atomically; the manifest, written last, records the data's SHA-256 (``.npz``). The
        manifest is built first, so an attack that cannot record its configuration raises
        before anything is written.
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

    classes = manifest.get("classes") or [str(i) for i in range(int(labels.max()) + 1)]
    if labels.numel() and int(labels.max()) >= len(classes):
        raise InputError(f"labels go up to {int(labels.max())} but the manifest names only {len(classes)} classes")
    p.mkdir(parents=True, exist_ok=True)
    files = []
    arr = (images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    for i, (img, lab) in enumerate(zip(arr, labels.tolist())):
        folder = class_folder(lab, len(classes))
        rel = f"{folder}/{i:06d}.png"
        (p / folder).mkdir(exist_ok=True)
        with atomic_path(p / rel, suffix=".png") as tmp:
            Image.fromarray(img[:, :, 0] if img.shape[2] == 1 else img).save(tmp, format="PNG")
        files.append(rel)
    manifest["files"] = files
    manifest["class_folders"] = "index"
    atomic_write_json(p / "manifest.json", manifest)
    return p


def class_folder(label: int, num_classes: int) -> str:
    """The folder of class ``label``: its index, zero-padded so that folders sort numerically.

    Names are never used as folder names: two classes may share a name, and a name may hold
    ``/`` or other characters a file system refuses. The names stay in the manifest.
    """
    return f"{label:0{len(str(max(num_classes - 1, 0)))}d}"


class LoadedPoisonedDataset(ArrayDataset):
    """A poisoned set read back from disk: an ``ArrayDataset`` plus its manifest and ground truth."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, manifest: dict[str, Any]):
        super().__init__(images, labels, manifest.get("classes"))
        self.manifest = manifest
        self.poisoned_indices: list[int] = list(manifest.get("poisoned_indices", []))
        self.noise_indices: list[int] = list(manifest.get("noise_indices", []))
        self.is_poisoned = torch.zeros(len(self), dtype=torch.bool)
        self.is_poisoned[self.poisoned_indices] = True

    def attack(self) -> Any:
        """The exact attack the set was poisoned with, rebuilt from the manifest (:func:`rebuild_attack`)."""
        return rebuild_attack(self.manifest)


def _read_manifest(path: Path) -> dict[str, Any]:
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise InputError(f"{path} is not a valid JSON manifest ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != "robustkit.poisoned":
        raise InputError(f"{path} is not a robustkit poisoned-dataset manifest")
    return manifest


def load_poisoned(path: str | Path) -> LoadedPoisonedDataset:
    """Read a poisoned set written by :meth:`PoisonedDataset.save` (checks the manifest and hash)."""
    p = Path(path)
    if not p.exists():
        raise DataNotFoundError(f"poisoned dataset not found: {p}")
    if p.is_dir():
        mpath = p / "manifest.json"
        if not mpath.is_file():
            raise DataNotFoundError(f"{p} has no manifest.json (not written by robustkit?)")
        manifest = _read_manifest(mpath)
        from PIL import Image

        imgs, labels = [], []
        classes = manifest.get("classes")
        files = manifest.get("files")
        if not isinstance(classes, list) or not isinstance(files, list) or not files:
            raise InputError(f"{mpath} lacks the 'classes' and 'files' lists of a robustkit poisoned folder")
        by_index = manifest.get("class_folders") == "index"
        folders = {class_folder(i, len(classes)): i for i in range(len(classes))} if by_index else None
        for rel in files:
            folder = str(rel).split("/")[0]
            if by_index:
                if folder not in folders:
                    raise InputError(f"{mpath}: file {rel!r} is not in a class folder 0..{len(classes) - 1}")
                labels.append(folders[folder])
            else:  # version 1: folders named by class name
                if folder not in classes:
                    raise InputError(f"{mpath}: file {rel!r} is in folder {folder!r}, which is not a class name")
                labels.append(classes.index(folder))
            if not (p / rel).is_file():
                raise DataNotFoundError(f"{p / rel} listed in {mpath} is missing")
            with Image.open(p / rel) as im:
                a = np.asarray(im)
            imgs.append(a[:, :, None] if a.ndim == 2 else a)
        x = torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).float() / 255
        y = torch.tensor(labels)
    else:
        mpath = p.with_name(p.name + ".manifest.json")
        if not mpath.is_file():
            raise DataNotFoundError(f"manifest {mpath} not found beside {p}")
        manifest = _read_manifest(mpath)
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

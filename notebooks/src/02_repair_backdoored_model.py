# %% [markdown]
# # Repair a backdoored model
#
# Someone hands you a trained classifier that may carry a backdoor, plus a little clean data
# (here 5% of the training set, class-balanced, as in BackdoorBench). This notebook:
#
# 1. poisons the built-in digits (real scans shipped with scikit-learn) with **BadNets** (a
#    patch; Gu et al., 2017) and **Blended** (a full-image pattern mixed in; Chen et al., 2017)
#    triggers and trains a PreActResNet18 victim on each;
# 2. repairs each victim with vanilla **fine-tuning**, **FT-SAM** (Zhu et al., ICCV 2023) and
#    **skip-connection suppression** (Yang et al., ICASSP 2023);
# 3. plots ACC and ASR over the repair epochs and prints the DER table (BackdoorBench; Wu et al.,
#    NeurIPS 2022 Datasets and Benchmarks).
#
# The defenses never see the attacker's trigger: it is used only to *measure* ASR. The CLI
# equivalent is `robustkit repair configs/repair_ftsam.yaml` (see docs/guide_repair.md).
# To stay well under a minute on 2 CPU cores the victims are small (PreActResNet18 with width 8
# on 16x16 digits; the sizes are in the first code cell). FT-SAM and skip suppression both need a
# network with residual blocks, hence the ResNet. `benchmarks/repair.py` runs the wider model
# (width 16) on 32x32 images against all four attacks; its results are in docs/repair.md.

# %%
import time
import torch
import matplotlib.pyplot as plt
import robustkit
from robustkit.data import digits
from robustkit.backdoor import BadNets, Blended
from robustkit.models import PreActResNet18
from robustkit.repair import FineTune, FTSAM, SkipSuppression, repair_and_measure
from robustkit.backdoor import backdoor_metrics

# sizes: the defaults keep the notebook under a minute on 2 CPU cores
SIZE = 16            # digits upsampled to SIZE x SIZE (32 in benchmarks/repair.py)
WIDTH = 8            # PreActResNet18 base width (64 is the paper's; 16 in benchmarks/repair.py)
VICTIM_EPOCHS = 10   # victim training (30 in configs/repair_ftsam.yaml)
REPAIR_EPOCHS = 40   # FineTune / FT-SAM passes over the 5% clean subset (100 in the paper)

torch.set_num_threads(2)
t_start = time.time()
data = digits(size=SIZE)
attacks = {"BadNets": BadNets(target=0, size=2), "Blended": Blended(target=0, alpha=0.2)}

# %% [markdown]
# ## 1. Train the victims
# 10% of the training images get the trigger and label 0. After training, the victim is accurate on
# clean images (ACC) and sends triggered images to class 0 (ASR).

# %%
victims, before = {}, {}
for name, attack in attacks.items():
    poisoned = attack.poison(data.train, rate=0.1, seed=0)
    torch.manual_seed(0)
    model = PreActResNet18(in_channels=1, num_classes=10, width=WIDTH)
    robustkit.train(model, poisoned, epochs=VICTIM_EPOCHS, lr=0.01, batch_size=64, progress=False)
    victims[name] = model.eval()
    before[name] = backdoor_metrics(model, attack, data.test)
    print(f"{name:8} victim: ACC {before[name].acc:.1%}  ASR {before[name].asr:.1%}")

x_clean = data.test[3][0]
fig, axes = plt.subplots(1, 3, figsize=(5, 1.9))
for ax, (title, img) in zip(axes, [("clean", x_clean)] + [(n, a.apply(x_clean[None])[0]) for n, a in attacks.items()]):
    ax.imshow(img[0], cmap="gray", vmin=0, vmax=1); ax.set_title(title, fontsize=8); ax.axis("off")
plt.show()

# %% [markdown]
# ## 2. Repair
# All three defenses get the same clean data: the clean training split, of which each uses a
# class-balanced 5% (`clean_ratio=0.05`, 69 images here).
#
# - `FineTune`: plain SGD on the clean images (lr 0.01, momentum 0.9, cosine).
# - `FTSAM`: the same budget, but every step takes the gradient at the worst point of an
#   ellipsoid around the weights, `eps = rho |w|^2 g / || |w| g ||` (adaptive SAM, rho = 2), plus
#   label smoothing 0.1. Large-norm neurons, which carry the backdoor, are pushed hardest.
# - `SkipSuppression`: the defender implants its *own* trigger (a checkerboard patch) in a copy,
#   sweeps the scale gamma of every skip connection to find where that trigger's shortcut
#   runs, zeroes that skip in the suspect model and fine-tunes the enclosing stage.
#
# Each `repair` returns a new model (the victim is untouched) and a per-epoch history.

# %%
defenses = {
    "FineTune": FineTune(epochs=REPAIR_EPOCHS, batch_size=32, eval_every=2),
    "FT-SAM": FTSAM(epochs=REPAIR_EPOCHS, batch_size=32, eval_every=2),
    "SkipSuppression": SkipSuppression(epochs=10, batch_size=32),
}
results = {}
for aname, attack in attacks.items():
    for dname, defense in defenses.items():
        t0 = time.time()
        # repair_and_measure: the defense sees only clean data; the trigger only measures ACC / ASR / RA / DER
        results[aname, dname] = repair_and_measure(victims[aname], defense, data.train, data.test, attack,
                                                   data.num_classes, progress=False)
        print(f"{aname:8} {dname:16} {time.time() - t0:5.1f} s")
print("skip connection chosen on the BadNets victim:", results["BadNets", "SkipSuppression"].result.details.layer)

# %% [markdown]
# ## 3. ACC and ASR over the repair epochs
# Solid lines: clean accuracy; dashed: attack success rate. Epoch 0 is the victim (for skip
# suppression: right after the skip connection was zeroed, before fine-tuning).

# %%
fig, axes = plt.subplots(1, 2, figsize=(11, 3.6), sharey=True)
for ax, aname in zip(axes, attacks):
    for i, dname in enumerate(defenses):
        hist = results[aname, dname].result.history
        for key, style in (("acc", "-"), ("asr", "--")):
            pts = [(h["epoch"], 100 * h[key]) for h in hist if key in h]
            ax.plot(*zip(*pts), style, color=f"C{i}", label=f"{dname} {key.upper()}")
    ax.set_title(aname); ax.set_xlabel("repair epoch"); ax.grid(alpha=0.3)
axes[0].set_ylabel("%"); axes[1].legend(fontsize=7)
plt.tight_layout(); plt.show()

# %% [markdown]
# ## 4. The DER table
# BackdoorBench's defense effectiveness rating, `DER = [max(0, dASR) - max(0, dACC) + 1] / 2`, with
# dASR = ASR before - ASR after and dACC = ACC before - ACC after: 1 means the backdoor is gone at
# no accuracy cost, 0.5 means nothing changed (or the ASR drop was paid for one-to-one in accuracy).
# RA (robust accuracy) is the share of triggered test images, of classes other than the target,
# that are still given their true label. All numbers are on the test split, which no defense saw.

# %%
print(f"| attack | defense | ACC | ASR | RA | DER |")
print(f"| --- | --- | --- | --- | --- | --- |")
for aname, attack in attacks.items():
    b = before[aname]
    print(f"| {aname} | none | {b.acc:.1%} | {b.asr:.1%} | {b.ra:.1%} | |")
    for dname in defenses:
        out = results[aname, dname]
        a = out.after
        print(f"| {aname} | {dname} | {a.acc:.1%} | {a.asr:.1%} | {a.ra:.1%} | {out.der:.3f} |")
print(f"\nnotebook ran in {time.time() - t_start:.0f} s")

# %% [markdown]
# ## Keep the repaired model
# `save_checkpoint` writes it atomically (here under `runs/`, which git ignores); a model repaired
# by skip suppression stores its suppressed skip connection too, and `load_checkpoint` puts it back.

# %%
from robustkit.models.checkpoints import save_checkpoint, load_checkpoint

path = save_checkpoint(results["BadNets", "SkipSuppression"].result.model, "runs/notebook02/repaired_badnets.pt")
reloaded = load_checkpoint(path)
print(path, "skip scaling:", reloaded.skip_scaling)

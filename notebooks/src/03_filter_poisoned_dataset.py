# %% [markdown]
# # Filter a poisoned dataset
#
# A training set may hide a few hundred images that carry a trigger and a wrong label. This
# notebook poisons the built-in digits (scikit-learn's real scans, no download) with **BadNets**,
# trains a small Vision Transformer on them, and asks three filters which samples look poisoned:
#
# - **attention entropy** (after BYE, NeurIPS 2025, in its ViT-classifier form): a trigger pins the
#   CLS token's attention in the heads that read it, so the entropy of their CLS-to-patch attention
#   is nearly the same on every poisoned image;
# - **activation clustering** (Chen et al., 2019) and **spectral signatures** (Tran et al., 2018)
#   on the penultimate features, which work for any classifier.
#
# The poisoned set knows which indices it poisoned, so we can measure TPR, FPR and AUROC, look at
# the most suspicious images, and retrain on what is kept to see the backdoor go away.
# The CLI equivalent is `robustkit run configs/filter_vit.yaml` or
# `robustkit filter --model victim.pt --data poisoned.npz --out clean/` (see docs/guide_filter.md).
# Runs in under 2 minutes on 2 quiet CPU cores.

# %%
import time
import torch
import matplotlib.pyplot as plt
import robustkit
from robustkit.data import digits
from robustkit.backdoor import BadNets
from robustkit.models import SmallViT
from robustkit.filtering import AttentionEntropyFilter, ActivationClustering, SpectralSignatures
from robustkit.backdoor import backdoor_metrics
from robustkit.filtering import filter_metrics

torch.manual_seed(0)
torch.set_num_threads(2)
EPOCHS = 30          # ViT training epochs (as in benchmarks/filtering.py)
t_start = time.time()

# %% [markdown]
# ## 1. Poison the data
# 10% of the training images get a 3x3 white patch in the bottom-right corner and the label 0
# (BackdoorBench's all-to-one setting).

# %%
data = digits(size=32)
attack = BadNets(target=0, size=3)
poisoned = attack.poison(data.train, rate=0.1, seed=0)
print(f"{len(poisoned)} training images, {len(poisoned.poisoned_indices)} poisoned")

fig, axes = plt.subplots(1, 6, figsize=(9, 1.8))
for ax, i in zip(axes, poisoned.poisoned_indices[:3] + [j for j in range(10) if not poisoned.is_poisoned[j]][:3]):
    x, y = poisoned[i]
    ax.imshow(x[0], cmap="gray"); ax.set_title(f"label {y}" + (" (poisoned)" if poisoned.is_poisoned[i] else ""), fontsize=7)
    ax.axis("off")
plt.show()

# %% [markdown]
# ## 2. Train a ViT on the suspect data
# The victim learns the task *and* the backdoor: high clean accuracy (ACC) and attack success
# rate (ASR: triggered test images of other classes classified as 0).

# %%
def train_vit(dataset):
    torch.manual_seed(0)
    model = SmallViT(image_size=32, in_channels=1, num_classes=10, patch_size=4, dim=64, depth=4, heads=4)
    robustkit.train(model, dataset, epochs=EPOCHS, lr=1e-3, optimizer="adamw", weight_decay=0.05,
                    warmup_epochs=2, progress=False)
    return model.eval()

victim = train_vit(poisoned)
before = backdoor_metrics(victim, attack, data.test)
print(f"victim: ACC {before.acc:.1%}  ASR {before.asr:.1%}")

# %% [markdown]
# ## 3. Run the filters
# Every filter returns a `FilterResult`: per-sample `scores` (higher = more suspicious), a
# `flagged` mask and `details`. The attention filter reads the attention maps through forward
# hooks (no model edits). Its default rule (`method="split"`) splits every class in two by the
# per-head entropies of the CLS attention, calls the half with the most compressed (pinned) head
# suspicious, and flags that half in the class that stands out - under all-to-one poisoning the
# target class, enlarged by the poisoned samples. Its `details` say which class it chose, how
# clearly that class split, and which of its premises failed (`warnings`; `confident` is True
# when there are none). BYE's own rule is `AttentionEntropyFilter(method="bye")`.

# %%
filters = {
    "attention_entropy": AttentionEntropyFilter(progress=False),
    "activation_clustering": ActivationClustering(progress=False),
    "spectral_signatures": SpectralSignatures(expected_rate=0.1, progress=False),
}
results, rows = {}, []
for name, f in filters.items():
    res = f.fit(victim, poisoned)
    results[name] = res
    m = filter_metrics(res, poisoned.is_poisoned)
    rows.append((name, m))
print(f"{'filter':22} {'TPR':>6} {'FPR':>6} {'prec':>6} {'F1':>6} {'AUROC':>6}")
for name, m in rows:
    print(f"{name:22} {m['tpr']:6.1%} {m['fpr']:6.1%} {m['precision']:6.1%} {m['f1']:6.1%} {m['auroc']:6.3f}")
ae = results["attention_entropy"].details
print(f"attention filter: method {ae['method']!r}, class evidence {ae['classes']!r}, "
      f"poisoned class(es) {ae['poisoned_classes']}, confident: {ae.confident}")
for c in ae["poisoned_classes"]:
    pc = ae["per_class"][c]
    print(f"  class {c}: {pc['n']} samples, split silhouette {pc['silhouette']:.2f}, "
          f"{pc['flagged']} flagged ({pc['suspicious_share']:.0%} of the class), "
          f"orientation margin {pc['gap']:.2f} nats (sure above log 2 = 0.69), evidence z-score {pc['evidence_z']:.1f}")
for w in ae["warnings"]:
    print("  warning:", w)

# %% [markdown]
# ## 4. Score histograms
# Clean samples in blue, poisoned in red. A good filter puts the red mass to the right.

# %%
truth = poisoned.is_poisoned.numpy()
fig, axes = plt.subplots(1, 3, figsize=(13, 3.2))
for ax, (name, res) in zip(axes, results.items()):
    s = res.scores.numpy()
    ax.hist(s[~truth], bins=40, alpha=0.7, color="tab:blue", label="clean")
    ax.hist(s[truth], bins=40, alpha=0.7, color="tab:red", label="poisoned")
    ax.set_yscale("log"); ax.set_title(name); ax.set_xlabel("score (higher = more suspicious)")
axes[0].legend()
plt.tight_layout(); plt.show()

# %% [markdown]
# ## 5. The most suspicious images
# The 16 highest attention-entropy scores; a red title marks a truly poisoned sample. The patch
# in the corner is what drew the attention.

# %%
res = results["attention_entropy"]
top = torch.argsort(res.scores, descending=True)[:16].tolist()
fig, axes = plt.subplots(2, 8, figsize=(12, 3.4))
for ax, i in zip(axes.ravel(), top):
    x, y = poisoned[i]
    ax.imshow(x[0], cmap="gray"); ax.axis("off")
    ax.set_title(f"#{i} y={y}", fontsize=7, color="tab:red" if poisoned.is_poisoned[i] else "black")
plt.show()

# %% [markdown]
# ## 6. Retrain on the kept samples
# `clean_subset` drops the flagged samples (the input set is never modified). A fresh ViT
# trained on what the attention filter kept should no longer carry the backdoor.

# %%
kept = res.clean_subset(poisoned)
retrained = train_vit(kept)
after = backdoor_metrics(retrained, attack, data.test)
print(f"kept {len(kept)} of {len(poisoned)} samples")
print(f"victim    : ACC {before.acc:.1%}  ASR {before.asr:.1%}")
print(f"retrained : ACC {after.acc:.1%}  ASR {after.asr:.1%}")
plt.figure(figsize=(4, 3))
plt.bar(["victim", "retrained on kept"], [100 * before.asr, 100 * after.asr], color=["tab:red", "tab:green"])
plt.ylabel("ASR (%)"); plt.title("BadNets ASR before / after filtering"); plt.show()
print(f"notebook ran in {time.time() - t_start:.0f} s")

# %% [markdown]
# ## What to take away
# On this model the attention-entropy filter finds BadNets (a run here: TPR 100%, FPR 0%, AUROC
# 1.000) and retraining on the kept data removes the backdoor; read its `warnings` all the same
# (that run warned that the split's orientation margin, 0.68 nats, was small). Over the benchmark
# matrix's SmallViT victims the split rule reached AUROC 0.89-1.00 on patch and full-image blend
# triggers, where BYE's own rule (`method="bye"`) stayed at 0.00-0.68. It is not a universal
# detector: a clean-label trigger (SIG) enlarges no class, so the rule has no class to split,
# flags nothing and warns. The feature baselines did far worse on these victims. See
# `docs/filtering.md` and `docs/backdoor.md` (the matrix, with IBM ART as a peer).

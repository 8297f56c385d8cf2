"""The training loss of Mask2Former (Section 3.3): matching, then class CE + mask BCE + mask dice.

For the final prediction set and, with deep supervision, each auxiliary set (matched separately):
- loss_ce: cross-entropy over K+1 classes for every query; unmatched queries target "no object" (index K),
  whose class weight is `no_object_weight` (PyTorch's weighted mean).
- loss_mask: BCE-with-logits averaged over points, summed over matched masks, divided by num_masks.
- loss_dice: 1 − (2·Σpt + 1) / (Σp + Σt + 1) over points per matched mask, summed, divided by num_masks.
The points are chosen per matched mask by importance sampling (`point_loss=True`), and the ground truth is
read at the same points (bilinear, so fractional near boundaries). `point_loss=False` (Table 5) instead
upsamples the matched mask logits to the target resolution (bilinear) and uses every pixel.
num_masks is the number of ground-truth segments in the batch, averaged over processes, at least 1.
"""

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from m2f.matcher import HungarianMatcher, Indices
from m2f.point_sampling import point_sample, uncertain_point_coords


def sigmoid_bce_loss(logits: Tensor, targets: Tensor) -> Tensor:
    """BCE-with-logits of each mask averaged over its points.

    Args:
        logits: (n, P) mask logits.
        targets: (n, P) target values in [0, 1].

    Returns:
        (n,) losses.
    """
    return F.binary_cross_entropy_with_logits(logits, targets, reduction="none").mean(1)


def dice_loss(logits: Tensor, targets: Tensor) -> Tensor:
    """Dice loss 1 − (2·Σpt + 1) / (Σp + Σt + 1) of each mask over its points (p = sigmoid).

    Args:
        logits: (n, P) mask logits.
        targets: (n, P) target values in [0, 1].

    Returns:
        (n,) losses.
    """
    probs = logits.sigmoid()
    return 1 - (2 * (probs * targets).sum(-1) + 1) / (probs.sum(-1) + targets.sum(-1) + 1)


class SetCriterion(nn.Module):
    """Hungarian-matched set loss over the final and the auxiliary prediction sets.

    Args:
        num_classes: K (the classifier has K+1 outputs, the last is "no object").
        matcher: assigns queries to ground-truth segments, run once per prediction set.
        class_weight / mask_weight / dice_weight: multipliers of loss_ce / loss_mask / loss_dice.
        no_object_weight: CE class weight of the "no object" class (the others have 1).
        num_points: P, points per matched mask (point_loss).
        oversample_ratio: k, candidate points drawn per kept point for importance sampling.
        importance_sample_ratio: β, share of the P points taken from the most uncertain candidates.
        point_loss: True: mask losses on importance-sampled points. False: on all target pixels.
        deep_supervision: also supervise every set in outputs["aux_outputs"].
    """

    def __init__(self, *, num_classes: int, matcher: HungarianMatcher, class_weight: float = 2.0,
                 mask_weight: float = 5.0, dice_weight: float = 5.0, no_object_weight: float = 0.1,
                 num_points: int = 12544, oversample_ratio: float = 3.0, importance_sample_ratio: float = 0.75,
                 point_loss: bool = True, deep_supervision: bool = True):
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"SetCriterion: num_classes must be >= 1, got {num_classes}")
        if point_loss and num_points < 1:
            raise ValueError(f"SetCriterion: num_points must be >= 1, got {num_points}")
        self.num_classes = num_classes
        self.matcher = matcher
        self.weights = {"loss_ce": class_weight, "loss_mask": mask_weight, "loss_dice": dice_weight}
        self.no_object_weight = no_object_weight
        self.num_points = num_points
        self.oversample_ratio = oversample_ratio
        self.importance_sample_ratio = importance_sample_ratio
        self.point_loss = point_loss
        self.deep_supervision = deep_supervision

    def forward(self, outputs: dict, targets: list[dict[str, Tensor]], *,
                generator: torch.Generator | None = None) -> dict[str, Tensor]:
        """Computes all loss terms.

        Random draws (matching points, then loss points, set by set: final, aux 0, aux 1, ...) come from
        `generator` or the global RNG, so equal RNG states give equal losses.

        Args:
            outputs: {"pred_logits": (B, Q, K+1), "pred_masks": (B, Q, h, w), "aux_outputs": [same keys]}.
            targets: B dicts {"labels": (G,), "masks": (G, H, W) bool} at the padded input resolution.
            generator: optional RNG; None uses the global RNG.

        Returns:
            {"loss": the sum to backpropagate, "loss_ce", "loss_mask", "loss_dice" for the final set and
            "loss_ce_i", ... for aux set i}: every term already multiplied by its weight, all 0-d tensors.
        """
        sets = [("", outputs)]
        if self.deep_supervision:
            sets += [(f"_{i}", aux) for i, aux in enumerate(outputs.get("aux_outputs", []))]
        num_masks = self.num_masks(targets, outputs["pred_logits"].device)
        terms: dict[str, Tensor] = {}
        for suffix, predictions in sets:
            indices = self.matcher(predictions, targets, generator=generator)
            unweighted = {"loss_ce": self.loss_labels(predictions["pred_logits"], targets, indices)}
            unweighted["loss_mask"], unweighted["loss_dice"] = self.loss_masks(
                predictions["pred_masks"], targets, indices, num_masks, generator=generator)
            terms.update({name + suffix: self.weights[name] * value for name, value in unweighted.items()})
        return {"loss": sum(terms.values()), **terms}

    def loss_labels(self, logits: Tensor, targets: list[dict[str, Tensor]], indices: Indices) -> Tensor:
        """Weighted-mean cross-entropy over all B·Q queries (unmatched ones target "no object").

        Args:
            logits: (B, Q, K+1) class logits.
            targets: B dicts with "labels" (G,).
            indices: B (pred_idx, tgt_idx) pairs from the matcher.

        Returns:
            0-d unweighted loss.
        """
        if logits.shape[-1] != self.num_classes + 1:
            raise ValueError(f"SetCriterion: pred_logits has {logits.shape[-1]} classes, expected num_classes + 1 "
                             f"= {self.num_classes + 1} (the last is 'no object')")
        device = logits.device
        target_classes = torch.full(logits.shape[:2], self.num_classes, dtype=torch.int64, device=device)
        for b, (pred_idx, tgt_idx) in enumerate(indices):
            target_classes[b, pred_idx.to(device)] = targets[b]["labels"].to(device)[tgt_idx.to(device)]
        class_weight = torch.ones(self.num_classes + 1, device=device)
        class_weight[-1] = self.no_object_weight
        return F.cross_entropy(logits.float().transpose(1, 2), target_classes, weight=class_weight)

    def loss_masks(self, pred_masks: Tensor, targets: list[dict[str, Tensor]], indices: Indices,
                   num_masks: float, *, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """BCE and dice of the matched masks, each summed over masks and divided by num_masks.

        Args:
            pred_masks: (B, Q, h, w) mask logits.
            targets: B dicts with "masks" (G, H, W).
            indices: B (pred_idx, tgt_idx) pairs from the matcher.
            num_masks: the normaliser (see `num_masks`).
            generator: optional RNG for the points.

        Returns:
            (loss_mask, loss_dice), 0-d unweighted; zeros still attached to pred_masks if nothing matched.
        """
        if sum(len(pred_idx) for pred_idx, _ in indices) == 0:
            # Keeps the graph (and DDP's expectation that every output gets a gradient) intact.
            zero = pred_masks.sum() * 0.0
            return zero, zero
        bce, dice = [], []
        for pred_values, tgt_values in self._matched_values(pred_masks, targets, indices, generator):
            bce.append(sigmoid_bce_loss(pred_values, tgt_values))
            dice.append(dice_loss(pred_values, tgt_values))
        return torch.cat(bce).sum() / num_masks, torch.cat(dice).sum() / num_masks

    def _matched_values(self, pred_masks: Tensor, targets: list[dict[str, Tensor]], indices: Indices,
                        generator: torch.Generator | None) -> list[tuple[Tensor, Tensor]]:
        """Per image with matches: (n, P) predicted logits and (n, P) target values of its n matched masks."""
        device = pred_masks.device
        batch_idx = torch.cat([torch.full_like(pred_idx, b) for b, (pred_idx, _) in enumerate(indices)])
        pred_idx = torch.cat([pred_idx for pred_idx, _ in indices])
        matched = pred_masks[batch_idx.to(device), pred_idx.to(device)].float()[:, None]  # (M, 1, h, w)
        counts = [len(tgt_idx) for _, tgt_idx in indices if len(tgt_idx)]
        tgt_masks = [t["masks"][tgt_idx.to(t["masks"].device)].to(device=device, dtype=torch.float32)[:, None]
                     for t, (_, tgt_idx) in zip(targets, indices) if len(tgt_idx)]  # (n, 1, H, W) each
        if self.point_loss:
            coords = uncertain_point_coords(matched, num_points=self.num_points,
                                            oversample_ratio=self.oversample_ratio,
                                            importance_sample_ratio=self.importance_sample_ratio,
                                            generator=generator)
            pred_values = point_sample(matched, coords)[:, 0].split(counts)
            with torch.no_grad():
                tgt_values = [point_sample(m, c)[:, 0] for m, c in zip(tgt_masks, coords.split(counts))]
            return list(zip(pred_values, tgt_values))
        upsampled = [F.interpolate(m, size=t.shape[-2:], mode="bilinear", align_corners=False).flatten(1)
                     for m, t in zip(matched.split(counts), tgt_masks)]
        return [(u, t.flatten(1)) for u, t in zip(upsampled, tgt_masks)]

    @staticmethod
    def num_masks(targets: list[dict[str, Tensor]], device: torch.device) -> float:
        """Ground-truth segments in the batch, averaged over processes when torch.distributed runs, >= 1.

        Args:
            targets: B dicts with "labels" (G,).
            device: where the all-reduce happens (CUDA for NCCL).

        Returns:
            The normaliser of the mask losses.
        """
        count = torch.tensor(float(sum(len(t["labels"]) for t in targets)), device=device)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(count)
            count = count / dist.get_world_size()
        return max(float(count), 1.0)

    def extra_repr(self) -> str:
        return (f"num_classes={self.num_classes}, weights={self.weights}, no_object_weight={self.no_object_weight}, "
                f"num_points={self.num_points}, oversample_ratio={self.oversample_ratio}, "
                f"importance_sample_ratio={self.importance_sample_ratio}, point_loss={self.point_loss}, "
                f"deep_supervision={self.deep_supervision}")

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

from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from m2f.config import Config
from m2f.matcher import HungarianMatcher, Indices
from m2f.point_sampling import point_sample, uncertain_point_coords


def sigmoid_bce_loss(logits: Tensor, targets: Tensor) -> Tensor:
    """BCE-with-logits of each mask averaged over its points.

    Args:
        logits: (n, N) mask logits.
        targets: (n, N) target values in [0, 1].

    Returns:
        (n,) losses.
    """
    return F.binary_cross_entropy_with_logits(logits, targets, reduction="none").mean(1)


def dice_loss(logits: Tensor, targets: Tensor) -> Tensor:
    """Dice loss 1 − (2·Σpt + 1) / (Σp + Σt + 1) of each mask over its points (p = sigmoid).

    Args:
        logits: (n, N) mask logits.
        targets: (n, N) target values in [0, 1].

    Returns:
        (n,) losses.
    """
    probs = logits.sigmoid()
    return 1 - (2 * (probs * targets).sum(-1) + 1) / (probs.sum(-1) + targets.sum(-1) + 1)


class SetCriterion(nn.Module):
    """Hungarian-matched set loss over the final and the auxiliary prediction sets.

    Args:
        num_classes: K (the classifier has K+1 outputs, the last is "no object").
        matcher: assigns queries to ground-truth segments, separately for every prediction set.
        class_weight / mask_weight / dice_weight: multipliers of loss_ce / loss_mask / loss_dice.
        no_object_weight: CE class weight of the "no object" class (the others have 1).
        num_points: N, points per matched mask (point_loss).
        oversample_ratio: k, candidate points drawn per kept point for importance sampling.
        importance_sample_ratio: β, share of the N points taken from the most uncertain candidates.
        point_loss: True: mask losses on importance-sampled points. False: on all target pixels.
        deep_supervision: also supervise the sets in outputs["aux_outputs"].
        supervise_initial: also supervise aux_outputs[0], the prediction from the initial query features
            (Table XI b: True for "learnable_supervised"; learnable without supervision and DETR's zero
            initialisation leave it out).
    """

    def __init__(self, *, num_classes: int, matcher: HungarianMatcher, class_weight: float = 2.0,
                 mask_weight: float = 5.0, dice_weight: float = 5.0, no_object_weight: float = 0.1,
                 num_points: int = 12544, oversample_ratio: float = 3.0, importance_sample_ratio: float = 0.75,
                 point_loss: bool = True, deep_supervision: bool = True, supervise_initial: bool = True):
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
        self.supervise_initial = supervise_initial

    def supervised_sets(self, outputs: dict[str, Any]) -> list[tuple[str, dict[str, Tensor]]]:
        """(name suffix, prediction set) pairs the loss sees: the final set "" first, then the supervised
        auxiliary sets "_i", i counted among the supervised ones (without prediction #0, "_0" is layer 1's)."""
        sets = [("", outputs)]
        if self.deep_supervision:
            aux = outputs.get("aux_outputs", [])
            sets += [(f"_{i}", a) for i, a in enumerate(aux if self.supervise_initial else aux[1:])]
        return sets

    def forward(self, outputs: dict[str, Any], targets: list[dict[str, Tensor]], *,
                generator: torch.Generator | None = None) -> dict[str, Tensor]:
        """Computes all loss terms, every prediction set matched separately but all sets in one batched pass.

        Random draws come from `generator` or the global RNG: the matching points of every set, then the loss
        points of every set, set by set (final, aux 0, aux 1, ...), so equal RNG states give equal losses, and
        on the CPU the same values as computing the sets one by one (`tests/test_criterion.py` checks it).

        Args:
            outputs: {"pred_logits": (B, Q, K+1), "pred_masks": (B, Q, h, w), "aux_outputs": [same keys]}.
            targets: B dicts {"labels": (G,), "masks": (G, H, W) bool} at the padded input resolution.
            generator: optional RNG; None uses the global RNG.

        Returns:
            {"loss": the sum to backpropagate, "loss_ce", "loss_mask", "loss_dice" for the final set and
            "loss_ce_i", ... for aux set i}: every term already multiplied by its weight, all 0-d tensors.
        """
        names, sets = zip(*self.supervised_sets(outputs))
        num_masks = self.num_masks(targets, outputs["pred_logits"].device)
        indices = self.matcher.match_sets(list(sets), targets, generator=generator)
        unweighted = {"loss_ce": self.loss_labels(torch.stack([p["pred_logits"] for p in sets]), targets, indices)}
        unweighted["loss_mask"], unweighted["loss_dice"] = self.loss_masks(
            torch.stack([p["pred_masks"] for p in sets]), targets, indices, num_masks, generator=generator)
        terms = {name + suffix: self.weights[name] * values[s]
                 for s, suffix in enumerate(names) for name, values in unweighted.items()}
        return {"loss": sum(terms.values()), **terms}

    def loss_labels(self, logits: Tensor, targets: list[dict[str, Tensor]], indices: list[Indices]) -> Tensor:
        """Per prediction set, the weighted-mean cross-entropy over all B·Q queries (unmatched ones target
        "no object"), as `F.cross_entropy(weight=...)` of each set.

        Args:
            logits: (T, B, Q, K+1) class logits of T prediction sets.
            targets: B dicts with "labels" (G,).
            indices: T lists of B (pred_idx, tgt_idx) pairs from the matcher.

        Returns:
            (T,) unweighted losses.
        """
        if logits.shape[-1] != self.num_classes + 1:
            raise ValueError(f"SetCriterion: pred_logits has {logits.shape[-1]} classes, expected num_classes + 1 "
                             f"= {self.num_classes + 1} (the last is 'no object')")
        device = logits.device
        set_idx, batch_idx, pred_idx, tgt_idx = (t.to(device) for t in _flat_indices(indices))
        labels = torch.cat([t["labels"].to(device) for t in targets])
        offsets = torch.tensor([0, *(len(t["labels"]) for t in targets)], device=device).cumsum(0)
        target_classes = torch.full(logits.shape[:3], self.num_classes, dtype=torch.int64, device=device)
        target_classes[set_idx, batch_idx, pred_idx] = labels[offsets[batch_idx] + tgt_idx]
        class_weight = torch.ones(self.num_classes + 1, device=device)
        class_weight[-1] = self.no_object_weight
        per_query = F.cross_entropy(logits.float().flatten(0, 1).transpose(1, 2), target_classes.flatten(0, 1),
                                    weight=class_weight, reduction="none").unflatten(0, logits.shape[:2])
        return per_query.sum((1, 2)) / class_weight[target_classes].sum((1, 2))

    def loss_masks(self, pred_masks: Tensor, targets: list[dict[str, Tensor]], indices: list[Indices],
                   num_masks: float, *, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """Per prediction set, BCE and dice of the matched masks, each summed over masks and divided by
        num_masks.

        Args:
            pred_masks: (T, B, Q, h, w) mask logits of T prediction sets.
            targets: B dicts with "masks" (G, H, W).
            indices: T lists of B (pred_idx, tgt_idx) pairs from the matcher.
            num_masks: the normaliser (see `num_masks`).
            generator: optional RNG for the points.

        Returns:
            (loss_mask, loss_dice), each (T,) unweighted; zeros still attached to pred_masks where nothing
            matched (keeps the graph, and DDP's expectation that every output gets a gradient, intact).
        """
        num_sets, device = pred_masks.shape[0], pred_masks.device
        set_idx, batch_idx, pred_idx, tgt_idx = (t.to(device) for t in _flat_indices(indices))
        if len(set_idx) == 0:
            zero = pred_masks.sum() * 0.0
            return zero.expand(num_sets), zero.expand(num_sets)
        matched = pred_masks[set_idx, batch_idx, pred_idx].float()[:, None]  # (n, 1, h, w), set-major order
        pred_values, tgt_values = self._matched_values(matched, targets, set_idx, batch_idx, tgt_idx, num_sets,
                                                       generator)
        per_set = torch.zeros(num_sets, device=device, dtype=pred_values.dtype)
        bce = per_set.index_add(0, set_idx, sigmoid_bce_loss(pred_values, tgt_values))
        dice = per_set.index_add(0, set_idx, dice_loss(pred_values, tgt_values))
        return bce / num_masks, dice / num_masks

    def _matched_values(self, matched: Tensor, targets: list[dict[str, Tensor]], set_idx: Tensor,
                        batch_idx: Tensor, tgt_idx: Tensor, num_sets: int,
                        generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
        """(n, N) predicted logits and (n, N) target values of the n matched masks (N = all target pixels
        without point_loss). A ground-truth mask is matched at most once per set, so its values at the points
        of all its matches are read in one (T·N)-point pass over the G masks of its image."""
        device = matched.device
        height, width = targets[0]["masks"].shape[-2:]
        if self.point_loss:
            coords = uncertain_point_coords(matched, num_points=self.num_points,
                                            oversample_ratio=self.oversample_ratio,
                                            importance_sample_ratio=self.importance_sample_ratio,
                                            generator=generator)  # (n, N, 2)
            pred_values = point_sample(matched, coords)[:, 0]
        else:
            pred_values = F.interpolate(matched, size=(height, width), mode="bilinear", align_corners=False).flatten(1)
        tgt_values = pred_values.new_empty(pred_values.shape)
        with torch.no_grad():
            for b, target in enumerate(targets):
                rows = (batch_idx == b).nonzero()[:, 0]
                if len(rows) == 0:
                    continue
                masks = target["masks"].to(device=device, dtype=torch.float32)  # (G, H, W)
                if not self.point_loss:
                    tgt_values[rows] = masks[tgt_idx[rows]].flatten(1)
                    continue
                grid = coords.new_zeros(len(masks), num_sets, self.num_points, 2)  # (G, T, N, 2)
                grid[tgt_idx[rows], set_idx[rows]] = coords[rows]
                values = point_sample(masks[:, None], grid.flatten(1, 2))[:, 0].unflatten(1, (num_sets, -1))
                tgt_values[rows] = values[tgt_idx[rows], set_idx[rows]]
        return pred_values, tgt_values

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
                f"deep_supervision={self.deep_supervision}, supervise_initial={self.supervise_initial}")


def build_criterion(cfg: Config) -> SetCriterion:
    """The matcher and the loss from `cfg.loss` (weights 2/5/5, 12544 importance-sampled points), and which
    prediction sets are supervised from `cfg.model.query_features`."""
    c = cfg.loss
    matcher = HungarianMatcher(cost_class=c.class_weight, cost_mask=c.mask_weight, cost_dice=c.dice_weight,
                               num_points=c.num_points, point_matching=c.point_matching)
    return SetCriterion(num_classes=cfg.model.num_classes, matcher=matcher, class_weight=c.class_weight,
                        mask_weight=c.mask_weight, dice_weight=c.dice_weight, no_object_weight=c.no_object_weight,
                        num_points=c.num_points, oversample_ratio=c.oversample_ratio,
                        importance_sample_ratio=c.importance_sample_ratio, point_loss=c.point_loss,
                        deep_supervision=c.deep_supervision,
                        supervise_initial=cfg.model.query_features == "learnable_supervised")


def _flat_indices(indices: list[Indices]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """T lists of B (pred_idx, tgt_idx) pairs -> four (n,) int64 tensors (set, image, query, segment), set-major
    then image order, on the CPU."""
    parts = [(torch.full_like(p, s), torch.full_like(p, b), p, t)
             for s, per_image in enumerate(indices) for b, (p, t) in enumerate(per_image)]
    if not parts:
        return (torch.zeros(0, dtype=torch.int64),) * 4
    return tuple(torch.cat(column) for column in zip(*parts))

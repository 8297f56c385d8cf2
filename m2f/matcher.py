"""Hungarian matching of predicted (class, mask) pairs to ground-truth segments (Section 3.3).

The cost of assigning query q to segment g is

    C[q, g] = cost_mask · BCE(q, g) + cost_class · (−p_q(label_g)) + cost_dice · dice(q, g),

with BCE and dice evaluated, as in the original, on one set of N uniform random points per image shared by
all queries and segments (`point_matching=True`). `point_matching=False` (Table 5, "matching with full
masks") follows MaskFormer's matcher instead: ground-truth masks are downsampled (nearest) to the
prediction's resolution and the costs use every pixel there. The assignment is scipy's
`linear_sum_assignment`, per image, on the CPU.
"""

import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn

from m2f.point_sampling import point_sample, random_points

Indices = list[tuple[Tensor, Tensor]]


def pairwise_sigmoid_bce(logits: Tensor, targets: Tensor) -> Tensor:
    """Mean BCE-with-logits of every prediction against every target, without forming Q·G·N terms.

    BCE(x, t) = t·BCE(x, 1) + (1 − t)·BCE(x, 0), so the pairwise mean is two matrix products.

    Args:
        logits: (Q, N) mask logits at N points (or pixels).
        targets: (G, N) target values in [0, 1] at the same points.

    Returns:
        (Q, G) costs.
    """
    pos = F.binary_cross_entropy_with_logits(logits, torch.ones_like(logits), reduction="none")
    neg = F.binary_cross_entropy_with_logits(logits, torch.zeros_like(logits), reduction="none")
    return (pos @ targets.T + neg @ (1 - targets).T) / logits.shape[1]


def pairwise_dice(logits: Tensor, targets: Tensor) -> Tensor:
    """Dice loss 1 − (2·Σpt + 1) / (Σp + Σt + 1) of every prediction against every target (p = sigmoid).

    Args:
        logits: (Q, N) mask logits.
        targets: (G, N) target values in [0, 1].

    Returns:
        (Q, G) costs.
    """
    probs = logits.sigmoid()
    numerator = 2 * probs @ targets.T
    denominator = probs.sum(-1)[:, None] + targets.sum(-1)[None, :]
    return 1 - (numerator + 1) / (denominator + 1)


class HungarianMatcher(nn.Module):
    """One-to-one assignment of the Q queries to the G ground-truth segments of each image.

    Args:
        cost_class: weight of the class cost −softmax(logits)[label].
        cost_mask: weight of the sigmoid BCE cost.
        cost_dice: weight of the dice cost.
        num_points: N, uniform points per image for the mask costs (used when point_matching).
        point_matching: True: costs on N random points (Mask2Former). False: costs on all pixels of the
            prediction's grid, the targets downsampled to it (nearest), as MaskFormer's matcher.
    """

    def __init__(self, *, cost_class: float = 2.0, cost_mask: float = 5.0, cost_dice: float = 5.0,
                 num_points: int = 12544, point_matching: bool = True):
        super().__init__()
        if cost_class == 0 and cost_mask == 0 and cost_dice == 0:
            raise ValueError("HungarianMatcher: cost_class, cost_mask and cost_dice cannot all be 0")
        if point_matching and num_points < 1:
            raise ValueError(f"HungarianMatcher: num_points must be >= 1, got {num_points}")
        self.cost_class = cost_class
        self.cost_mask = cost_mask
        self.cost_dice = cost_dice
        self.num_points = num_points
        self.point_matching = point_matching

    @torch.no_grad()
    def cost_matrices(self, outputs: dict[str, Tensor], targets: list[dict[str, Tensor]], *,
                      generator: torch.Generator | None = None) -> list[dict[str, Tensor]]:
        """The unweighted cost terms of each image.

        With point matching, the RNG is used for one draw of (1, N, 2) points per image, in batch order
        (images without targets included), so a batch consumes it exactly as its images matched one by
        one.

        Args:
            outputs: {"pred_logits": (B, Q, K+1), "pred_masks": (B, Q, h, w)}.
            targets: B dicts {"labels": (G,), "masks": (G, H, W)}.
            generator: optional RNG for the points; None uses the global RNG.

        Returns:
            B dicts {"class", "mask", "dice"} of (Q, G) fp32 costs.
        """
        logits, pred_masks = outputs["pred_logits"], outputs["pred_masks"]
        _check_inputs(logits, pred_masks, targets)
        batch, num_queries = logits.shape[:2]
        device = pred_masks.device
        # fp32 with autocast off: a half-precision cost ties or overflows and the matching degrades.
        with torch.autocast(device.type, enabled=False):
            probs = logits.float().softmax(-1)
            pred_masks = pred_masks.float()
            if self.point_matching:
                coords = torch.cat([random_points(1, self.num_points, device=device, generator=generator)
                                    for _ in range(batch)])
                pred_values = point_sample(pred_masks, coords)  # (B, Q, N)
            else:
                pred_values = pred_masks.flatten(2)
            costs = []
            for b, target in enumerate(targets):
                labels, masks = target["labels"], target["masks"]
                if len(labels) == 0:
                    empty = probs.new_zeros(num_queries, 0)
                    costs.append({"class": empty, "mask": empty, "dice": empty})
                    continue
                masks = masks.to(device=device, dtype=torch.float32)
                if self.point_matching:
                    tgt_values = point_sample(masks[None], coords[b:b + 1])[0]  # (G, N)
                else:
                    tgt_values = F.interpolate(masks[:, None], size=pred_masks.shape[-2:], mode="nearest").flatten(1)
                costs.append({"class": -probs[b][:, labels.to(device)],
                              "mask": pairwise_sigmoid_bce(pred_values[b], tgt_values),
                              "dice": pairwise_dice(pred_values[b], tgt_values)})
        return costs

    @torch.no_grad()
    def forward(self, outputs: dict[str, Tensor], targets: list[dict[str, Tensor]], *,
                generator: torch.Generator | None = None) -> Indices:
        """Matches each image's queries to its segments.

        Args:
            outputs: {"pred_logits": (B, Q, K+1), "pred_masks": (B, Q, h, w)}; other keys are ignored.
            targets: B dicts {"labels": (G,), "masks": (G, H, W) bool}.
            generator: optional RNG for the points; None uses the global RNG.

        Returns:
            B pairs (pred_idx, tgt_idx) of int64 CPU tensors of length min(Q, G): query pred_idx[i] is
            assigned to segment tgt_idx[i]; pred_idx is increasing.

        Raises:
            FloatingPointError: a cost is NaN or infinite (a diverged model), naming the terms and image.
        """
        indices = []
        for b, cost in enumerate(self.cost_matrices(outputs, targets, generator=generator)):
            total = self.cost_mask * cost["mask"] + self.cost_class * cost["class"] + self.cost_dice * cost["dice"]
            total = total.cpu()
            if not torch.isfinite(total).all():
                raise FloatingPointError(_non_finite_message(cost, b))
            rows, cols = linear_sum_assignment(total.numpy())
            indices.append((torch.as_tensor(rows, dtype=torch.int64), torch.as_tensor(cols, dtype=torch.int64)))
        return indices

    def extra_repr(self) -> str:
        return (f"cost_class={self.cost_class}, cost_mask={self.cost_mask}, cost_dice={self.cost_dice}, "
                f"num_points={self.num_points}, point_matching={self.point_matching}")


def _check_inputs(logits: Tensor, pred_masks: Tensor, targets: list[dict[str, Tensor]]) -> None:
    if logits.dim() != 3 or pred_masks.dim() != 4 or logits.shape[:2] != pred_masks.shape[:2]:
        raise ValueError(f"matcher: expected pred_logits (B, Q, K+1) and pred_masks (B, Q, h, w), got "
                         f"{tuple(logits.shape)} and {tuple(pred_masks.shape)}")
    if len(targets) != logits.shape[0]:
        raise ValueError(f"matcher: {len(targets)} targets for a batch of {logits.shape[0]} predictions")
    num_classes = logits.shape[-1] - 1
    for b, target in enumerate(targets):
        labels, masks = target["labels"], target["masks"]
        if masks.dim() != 3 or masks.shape[0] != len(labels):
            raise ValueError(f"matcher: targets[{b}] has {len(labels)} labels but masks of shape "
                             f"{tuple(masks.shape)}; expected (G, H, W) with G = len(labels)")
        if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
            raise ValueError(f"matcher: targets[{b}]['labels'] must lie in [0, {num_classes}) "
                             f"(pred_logits has K+1 = {num_classes + 1} outputs), got {labels.tolist()}")


def _non_finite_message(cost: dict[str, Tensor], image: int) -> str:
    bad = [name for name in ("class", "mask", "dice") if not torch.isfinite(cost[name]).all()] or ["weighted"]
    return (f"Hungarian matching: non-finite (NaN/inf) values in the {'/'.join(bad)} cost term(s) of image "
            f"{image} in the batch. The predictions have diverged: lower the learning rate, or disable mixed "
            f"precision (AMP); check the inputs for NaN.")

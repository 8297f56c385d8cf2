"""Hungarian matching of predicted (class, mask) pairs to ground-truth segments (Section 3.3).

The cost of assigning query q to segment g is

    C[q, g] = cost_mask · BCE(q, g) + cost_class · (−p_q(label_g)) + cost_dice · dice(q, g),

with BCE and dice evaluated, as in the original, on one set of N uniform random points per image shared by
all queries and segments (`point_matching=True`). `point_matching=False` (Table 5, "matching with full
masks") follows MaskFormer's matcher instead: ground-truth masks are downsampled (nearest) to the
prediction's resolution and the costs use every pixel there. The assignment is scipy's
`linear_sum_assignment`, per image, on the CPU. `match_sets` matches all prediction sets of a batch with one
cost computation and one device-to-host copy (the training loss uses it: 10 sets x B images).
"""

import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn

from m2f.point_sampling import point_sample, random_points

Indices = list[tuple[Tensor, Tensor]]


def pairwise_sigmoid_bce(logits: Tensor, targets: Tensor) -> Tensor:
    """Mean BCE-with-logits of every prediction against every target, without forming Q·G·N terms.

    BCE(x, t) = softplus(x) − t·x, so the pairwise mean is one row sum and one matrix product (the same
    value as t·BCE(x, 1) + (1 − t)·BCE(x, 0) with its two products, up to float rounding, in one elementwise
    pass instead of about ten).

    Args:
        logits: (..., Q, N) mask logits at N points (or pixels); leading dimensions are batched.
        targets: (..., G, N) target values in [0, 1] at the same points.

    Returns:
        (..., Q, G) costs.
    """
    return (F.softplus(logits).sum(-1, keepdim=True) - logits @ targets.mT) / logits.shape[-1]


def pairwise_dice(logits: Tensor, targets: Tensor) -> Tensor:
    """Dice loss 1 − (2·Σpt + 1) / (Σp + Σt + 1) of every prediction against every target (p = sigmoid).

    Args:
        logits: (..., Q, N) mask logits; leading dimensions are batched.
        targets: (..., G, N) target values in [0, 1].

    Returns:
        (..., Q, G) costs.
    """
    probs = logits.sigmoid()
    numerator = 2 * probs @ targets.mT
    denominator = probs.sum(-1)[..., :, None] + targets.sum(-1)[..., None, :]
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
        """The unweighted cost terms of each image for one prediction set.

        Args:
            outputs: {"pred_logits": (B, Q, K+1), "pred_masks": (B, Q, h, w)}.
            targets: B dicts {"labels": (G,), "masks": (G, H, W)}.
            generator: optional RNG for the points; None uses the global RNG.

        Returns:
            B dicts {"class", "mask", "dice"} of (Q, G) fp32 costs.
        """
        return [{k: v[0] for k, v in cost.items()} for cost in self._set_costs([outputs], targets, generator)]

    @torch.no_grad()
    def forward(self, outputs: dict[str, Tensor], targets: list[dict[str, Tensor]], *,
                generator: torch.Generator | None = None) -> Indices:
        """Matches each image's queries to its segments (one prediction set; see `match_sets`).

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
        return self.match_sets([outputs], targets, generator=generator)[0]

    @torch.no_grad()
    def match_sets(self, sets: list[dict[str, Tensor]], targets: list[dict[str, Tensor]], *,
                   generator: torch.Generator | None = None) -> list[Indices]:
        """Matches T prediction sets of the same batch (the final and the auxiliary ones) at once: the costs of
        all sets are computed together and moved to the CPU in one transfer, then each (set, image) is
        assigned. The result equals T calls of `forward`, one per set in order, from the same RNG state (the
        RNG draws one set of N points per (set, image), set-major).

        Args:
            sets: T dicts {"pred_logits": (B, Q, K+1), "pred_masks": (B, Q, h, w)} of equal shapes.
            targets: B dicts {"labels": (G,), "masks": (G, H, W) bool}.
            generator: optional RNG for the points; None uses the global RNG.

        Returns:
            T lists of B (pred_idx, tgt_idx) pairs, as `forward`.

        Raises:
            FloatingPointError: a cost is NaN or infinite (a diverged model), naming the terms and image.
        """
        costs = self._set_costs(sets, targets, generator)  # B dicts of (T, Q, G)
        totals = [self.cost_mask * c["mask"] + self.cost_class * c["class"] + self.cost_dice * c["dice"]
                  for c in costs]
        flat = torch.cat([t.flatten() for t in totals]).cpu()  # one device-to-host copy
        if not torch.isfinite(flat).all():
            bad = next(b for b, t in enumerate(totals) if not torch.isfinite(t).all())
            raise FloatingPointError(_non_finite_message(costs[bad], bad))
        per_image = [chunk.view(t.shape).numpy() for chunk, t in zip(flat.split([t.numel() for t in totals]), totals)]
        indices: list[Indices] = []
        for s in range(len(sets)):
            indices.append([])
            for total in per_image:
                rows, cols = linear_sum_assignment(total[s])
                indices[s].append((torch.as_tensor(rows, dtype=torch.int64), torch.as_tensor(cols, dtype=torch.int64)))
        return indices

    def _set_costs(self, sets: list[dict[str, Tensor]], targets: list[dict[str, Tensor]],
                   generator: torch.Generator | None) -> list[dict[str, Tensor]]:
        """B dicts {"class", "mask", "dice"} of (T, Q, G) fp32 unweighted costs of the T prediction sets."""
        for predictions in sets:
            _check_inputs(predictions["pred_logits"], predictions["pred_masks"], targets)
        num_sets = len(sets)
        batch, num_queries = sets[0]["pred_logits"].shape[:2]
        device = sets[0]["pred_masks"].device
        # fp32 with autocast off: a half-precision cost ties or overflows and the matching degrades.
        with torch.autocast(device.type, enabled=False):
            probs = torch.stack([p["pred_logits"] for p in sets]).float().softmax(-1)  # (T, B, Q, K+1)
            pred_masks = torch.stack([p["pred_masks"] for p in sets]).float()  # (T, B, Q, h, w)
            if self.point_matching:
                # One draw equals T·B draws of (1, N, 2) in (set, image) order: what per-set calls consume.
                coords = random_points(num_sets * batch, self.num_points, device=device, generator=generator)
                pred_values = point_sample(pred_masks.flatten(0, 1), coords).unflatten(0, (num_sets, batch))
                coords = coords.unflatten(0, (num_sets, batch))  # (T, B, N, 2)
            else:
                pred_values = pred_masks.flatten(3)  # (T, B, Q, h·w)
            costs = []
            for b, target in enumerate(targets):
                labels, masks = target["labels"], target["masks"]
                if len(labels) == 0:
                    empty = probs.new_zeros(num_sets, num_queries, 0)
                    costs.append({"class": empty, "mask": empty, "dice": empty})
                    continue
                masks = masks.to(device=device, dtype=torch.float32)
                if self.point_matching:
                    # The T point sets of this image as one (1, T·N) read of its G masks.
                    tgt_values = point_sample(masks[None], coords[:, b].reshape(1, -1, 2))[0]  # (G, T·N)
                    tgt_values = tgt_values.unflatten(1, (num_sets, -1)).transpose(0, 1)  # (T, G, N)
                else:
                    tgt_values = F.interpolate(masks[:, None], size=pred_masks.shape[-2:], mode="nearest").flatten(1)
                    tgt_values = tgt_values.expand(num_sets, -1, -1)
                costs.append({"class": -probs[:, b][..., labels.to(device)],
                              "mask": pairwise_sigmoid_bce(pred_values[:, b], tgt_values),
                              "dice": pairwise_dice(pred_values[:, b], tgt_values)})
        return costs

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

"""Semantic, panoptic and instance inference from mask-classification outputs, as the original.

All three start from the same resize of the mask logits (the original's shared first steps):
bilinear (align_corners=False) upsampling of the (Q, H_pad/4, W_pad/4) logits to the padded input
size, a crop to the valid (unpadded) image size, and a bilinear resize to the requested output size
(the original image size). Sigmoids are taken after the resize, as in the original.

Memory: the original upsamples all Q mask logits to full resolution as float at once, which is
where users run out of memory on large images. Here queries are resized in chunks of `chunk_size`
and reduced on the fly, so at most `chunk_size` full-resolution float masks exist at a time:
- semantic: the (K, H, W) score map is accumulated chunk by chunk;
- panoptic: only the queries that pass the score threshold are resized at all; the per-pixel argmax
  is a running (max, index) over chunks, and the kept queries' masks are stored as bool (1 byte per
  pixel instead of 4);
- instance: each distinct selected query is resized once; its mask is stored as bool and its mask
  score is reduced per chunk. The (k, H, W) bool output itself is what the task returns.
Results are identical to resizing all queries at once (the running argmax keeps the first maximum,
as `argmax` does).

Batches are processed image by image (each image has its own valid and output size); `postprocess`
does that loop for a model output dict.
"""

from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

Size = tuple[int, int]


def _check_size(name: str, size: Sequence[int]) -> Size:
    if len(size) != 2 or int(size[0]) <= 0 or int(size[1]) <= 0:
        raise ValueError(f"{name} must be a positive (height, width), got {tuple(size)}")
    return int(size[0]), int(size[1])


def _bilinear(x: Tensor, size: Size) -> Tensor:
    """Resizes (n, h, w) to (n, *size) bilinearly, align_corners=False; a no-op at the same size."""
    if tuple(x.shape[-2:]) == size:
        return x
    return F.interpolate(x[None], size=size, mode="bilinear", align_corners=False)[0]


def _to_valid(mask_logits: Tensor, padded_size: Size, image_size: Size) -> Tensor:
    """(n, h, w) logits -> (n, *image_size): upsample to the padded input, crop the padding away."""
    return _bilinear(mask_logits.float(), padded_size)[:, : image_size[0], : image_size[1]]


def resize_mask_logits(mask_logits: Tensor, *, padded_size: Sequence[int], image_size: Sequence[int],
                       output_size: Sequence[int]) -> Tensor:
    """The shared first step of all three tasks, for a set of mask logits.

    Args:
        mask_logits: (n, h, w) mask logits at 1/4 of the padded input.
        padded_size: (H_pad, W_pad) of the padded batch the model saw.
        image_size: (h_img, w_img) of the valid (unpadded) image inside it.
        output_size: (H, W) requested output size (usually the original image size).

    Returns:
        (n, H, W) float32 mask logits.
    """
    padded, image, output = _sizes(padded_size, image_size, output_size)
    return _bilinear(_to_valid(mask_logits, padded, image), output)


def _sizes(padded_size: Sequence[int], image_size: Sequence[int],
           output_size: Sequence[int]) -> tuple[Size, Size, Size]:
    padded = _check_size("padded_size", padded_size)
    image = _check_size("image_size", image_size)
    output = _check_size("output_size", output_size)
    if image[0] > padded[0] or image[1] > padded[1]:
        raise ValueError(f"image_size {image} is larger than padded_size {padded}")
    return padded, image, output


def _check_prediction(pred_logits: Tensor, pred_masks: Tensor) -> None:
    if pred_logits.dim() != 2 or pred_masks.dim() != 3 or pred_logits.shape[0] != pred_masks.shape[0]:
        raise ValueError(f"expected pred_logits (Q, K+1) and pred_masks (Q, h, w) with the same Q, got "
                         f"{tuple(pred_logits.shape)} and {tuple(pred_masks.shape)}")
    if pred_logits.shape[1] < 2:
        raise ValueError(f"pred_logits needs at least one class plus no-object, "
                         f"got {tuple(pred_logits.shape)}")


def _resized_chunks(mask_logits: Tensor, chunk_size: int,
                    resize: Callable[[Tensor], Tensor]) -> Iterator[tuple[int, Tensor]]:
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    for start in range(0, mask_logits.shape[0], chunk_size):
        yield start, resize(mask_logits[start : start + chunk_size])


def _as_is_thing(is_thing: Sequence[bool] | Tensor, num_classes: int, device: torch.device) -> Tensor:
    flags = torch.as_tensor(is_thing, dtype=torch.bool, device=device).flatten()
    if flags.numel() != num_classes:
        raise ValueError(f"is_thing has {flags.numel()} entries but the classifier has "
                         f"K={num_classes} classes")
    return flags


def semantic_inference(pred_logits: Tensor, pred_masks: Tensor, *, padded_size: Sequence[int],
                       image_size: Sequence[int], output_size: Sequence[int], return_scores: bool = False,
                       postprocess_before_inference: bool = True, chunk_size: int = 16) -> Tensor:
    """Semantic segmentation of one image: semseg[k, x] = sum_q p_q(k) * sigmoid(mask_q(x)).

    p_q is the softmax over K+1 classes with no-object dropped (the sum is not renormalised).

    Args:
        pred_logits: (Q, K+1) class logits.
        pred_masks: (Q, h, w) mask logits at 1/4 of the padded input.
        padded_size: (H_pad, W_pad) of the padded batch.
        image_size: (h_img, w_img) valid image size inside the padded batch.
        output_size: (H, W) size of the result (the original image size).
        return_scores: return the (K, H, W) score map instead of the (H, W) label map.
        postprocess_before_inference: True (the original's panoptic/instance models, and the default
            here): masks are resized to the output size before they are combined. False (the original's
            semantic-only models, e.g. ADE20K): combine at the valid image size, then resize the score map.
        chunk_size: queries resized at a time (bounds memory; see the module docstring).

    Returns:
        (H, W) int64 labels in [0, K), or with `return_scores` the (K, H, W) float32 score map.
    """
    _check_prediction(pred_logits, pred_masks)
    padded, image, output = _sizes(padded_size, image_size, output_size)
    probs = pred_logits.float().softmax(-1)[:, :-1]
    size = output if postprocess_before_inference else image
    semseg = probs.new_zeros((probs.shape[1], *size))
    for start, logits in _resized_chunks(pred_masks, chunk_size,
                                         lambda x: _bilinear(_to_valid(x, padded, image), size)):
        semseg += torch.einsum("qk,qhw->khw", probs[start : start + logits.shape[0]], logits.sigmoid())
    semseg = _bilinear(semseg, output)
    return semseg if return_scores else semseg.argmax(0)


def panoptic_inference(pred_logits: Tensor, pred_masks: Tensor, *, padded_size: Sequence[int],
                       image_size: Sequence[int], output_size: Sequence[int],
                       is_thing: Sequence[bool] | Tensor, object_mask_threshold: float = 0.8,
                       overlap_threshold: float = 0.8, chunk_size: int = 16) -> dict[str, Any]:
    """Panoptic segmentation of one image, following the original rules.

    1. score_q, label_q = max of the softmax over K+1; keep queries with label != no-object and
       score > `object_mask_threshold` (paper default 0.8).
    2. Every pixel goes to argmax_q score_q * sigmoid(mask_q) over the kept queries.
    3. A kept query q gives the segment (argmax == q) AND (sigmoid(mask_q) >= 0.5); it is skipped when
       that segment, #(argmax == q) or #(sigmoid(mask_q) >= 0.5) is empty, or when
       #(argmax == q) / #(sigmoid(mask_q) >= 0.5) < `overlap_threshold` (paper default 0.8).
    4. Queries of the same stuff class share the segment id of the first one (merged).
    Segment ids count from 1 in query order; 0 is void (pixels of no segment).

    Args:
        pred_logits: (Q, K+1) class logits.
        pred_masks: (Q, h, w) mask logits at 1/4 of the padded input.
        padded_size: (H_pad, W_pad) of the padded batch.
        image_size: (h_img, w_img) valid image size inside the padded batch.
        output_size: (H, W) size of the result (the original image size).
        is_thing: (K,) bool per contiguous class: thing (instance-level) or stuff.
        object_mask_threshold: minimum class score of a kept query (strictly greater).
        overlap_threshold: minimum fraction of a query's own mask that must survive the argmax.
        chunk_size: queries resized at a time (bounds memory; see the module docstring).

    Returns:
        {"panoptic_seg": (H, W) int32 segment ids, "segments_info": [{"id", "isthing",
        "category_id" (contiguous class index), "score" (class score of the segment's first query)}]}.
    """
    _check_prediction(pred_logits, pred_masks)
    padded, image, output = _sizes(padded_size, image_size, output_size)
    num_classes = pred_logits.shape[1] - 1
    thing = _as_is_thing(is_thing, num_classes, pred_logits.device)
    scores, labels = pred_logits.float().softmax(-1).max(-1)
    keep = (labels != num_classes) & (scores > object_mask_threshold)
    scores, labels, masks = scores[keep], labels[keep], pred_masks[keep]
    device = pred_masks.device
    panoptic_seg = torch.zeros(output, dtype=torch.int32, device=device)
    if masks.shape[0] == 0:
        return {"panoptic_seg": panoptic_seg, "segments_info": []}

    best = torch.full(output, -1.0, device=device)
    owner = torch.zeros(output, dtype=torch.long, device=device)
    inside = torch.empty((masks.shape[0], *output), dtype=torch.bool, device=device)
    for start, logits in _resized_chunks(masks, chunk_size, lambda x: resize_mask_logits(
            x, padded_size=padded, image_size=image, output_size=output)):
        prob = logits.sigmoid()
        inside[start : start + prob.shape[0]] = prob >= 0.5
        chunk_best, chunk_owner = (scores[start : start + prob.shape[0], None, None] * prob).max(0)
        # Strictly greater: ties keep the earlier query, as a global argmax does.
        better = chunk_best > best
        best = torch.where(better, chunk_best, best)
        owner = torch.where(better, chunk_owner + start, owner)

    n = masks.shape[0]
    owner_inside = inside.gather(0, owner[None])[0]
    assigned_area = torch.bincount(owner.flatten(), minlength=n).tolist()
    final_area = torch.bincount(owner[owner_inside], minlength=n).tolist()
    original_area = inside.flatten(1).sum(1).tolist()

    segment_of_query = [0] * n
    segments_info: list[dict[str, Any]] = []
    stuff_segment: dict[int, int] = {}
    for q in range(n):
        if min(assigned_area[q], original_area[q], final_area[q]) == 0:
            continue
        if assigned_area[q] / original_area[q] < overlap_threshold:
            continue
        label = int(labels[q])
        isthing = bool(thing[label])
        if not isthing and label in stuff_segment:
            segment_of_query[q] = stuff_segment[label]
            continue
        segment_id = len(segments_info) + 1
        if not isthing:
            stuff_segment[label] = segment_id
        segment_of_query[q] = segment_id
        segments_info.append({"id": segment_id, "isthing": isthing, "category_id": label,
                              "score": float(scores[q])})
    ids = torch.tensor(segment_of_query, dtype=torch.int32, device=device)
    panoptic_seg = torch.where(owner_inside, ids[owner], panoptic_seg)
    return {"panoptic_seg": panoptic_seg, "segments_info": segments_info}


def instance_inference(pred_logits: Tensor, pred_masks: Tensor, *, padded_size: Sequence[int],
                       image_size: Sequence[int], output_size: Sequence[int], topk: int = 100,
                       is_thing: Sequence[bool] | Tensor | None = None,
                       chunk_size: int = 16) -> dict[str, Tensor]:
    """Instance segmentation of one image, following the original rules.

    The top `topk` (paper default 100) of all Q*K (query, class) pairs of softmax[:, :K] are taken, so a
    query can appear with several classes (query = flat_index // K, class = flat_index % K). With
    `is_thing` (a panoptic model) only pairs with a thing class are kept. Binary mask = logit > 0;
    mask_score = sum(sigmoid * binary) / (sum(binary) + 1e-6); score = class prob * mask_score.

    Args:
        pred_logits: (Q, K+1) class logits.
        pred_masks: (Q, h, w) mask logits at 1/4 of the padded input.
        padded_size: (H_pad, W_pad) of the padded batch.
        image_size: (h_img, w_img) valid image size inside the padded batch.
        output_size: (H, W) size of the result (the original image size).
        topk: number of (query, class) pairs kept before the thing filter.
        is_thing: (K,) bool per class; when given, predictions of stuff classes are dropped.
        chunk_size: queries resized at a time (bounds memory; see the module docstring).

    Returns:
        {"masks": (k, H, W) bool, "scores": (k,) float32, "labels": (k,) int64 contiguous class indices},
        ordered by class probability (descending), k <= topk.
    """
    _check_prediction(pred_logits, pred_masks)
    padded, image, output = _sizes(padded_size, image_size, output_size)
    num_classes = pred_logits.shape[1] - 1
    class_probs = pred_logits.float().softmax(-1)[:, :-1].flatten()
    top_probs, flat_index = class_probs.topk(min(topk, class_probs.numel()))
    labels = flat_index % num_classes
    queries = flat_index // num_classes
    if is_thing is not None:
        keep = _as_is_thing(is_thing, num_classes, pred_logits.device)[labels]
        top_probs, labels, queries = top_probs[keep], labels[keep], queries[keep]

    unique_queries, which = queries.unique(return_inverse=True)
    binary = torch.empty((unique_queries.numel(), *output), dtype=torch.bool, device=pred_masks.device)
    mask_scores = torch.empty(unique_queries.numel(), device=pred_masks.device)
    for start, logits in _resized_chunks(pred_masks[unique_queries], chunk_size, lambda x: resize_mask_logits(
            x, padded_size=padded, image_size=image, output_size=output)):
        chunk = logits > 0
        binary[start : start + chunk.shape[0]] = chunk
        mask_scores[start : start + chunk.shape[0]] = (
            (logits.sigmoid() * chunk).flatten(1).sum(1) / (chunk.flatten(1).sum(1) + 1e-6))
    return {"masks": binary[which], "scores": top_probs * mask_scores[which], "labels": labels}


Task = Literal["semantic", "panoptic", "instance"]
_INFERENCE = {"semantic": semantic_inference, "panoptic": panoptic_inference, "instance": instance_inference}


def postprocess(outputs: Mapping[str, Any], *, task: Task, image_sizes: Sequence[Sequence[int]],
                output_sizes: Sequence[Sequence[int]] | None = None, padded_size: Sequence[int] | None = None,
                **options: Any) -> list[Any]:
    """Runs one task's inference on every image of a batch of model outputs.

    Args:
        outputs: {"pred_logits": (B, Q, K+1), "pred_masks": (B, Q, h, w)} (a model output or one of its
            "aux_outputs"); an optional "padded_size" entry is used when `padded_size` is not given.
        task: "semantic", "panoptic" or "instance".
        image_sizes: per image its valid (h_img, w_img) inside the padded batch.
        output_sizes: per image the output (H, W), usually the original size; default `image_sizes`.
        padded_size: (H_pad, W_pad); default outputs["padded_size"], else 4 x the mask size.
        **options: keyword arguments of `semantic_inference` / `panoptic_inference` /
            `instance_inference` (thresholds, `is_thing`, `return_scores`, `chunk_size`, ...).

    Returns:
        One result per image, as the task's inference function returns it.
    """
    if task not in _INFERENCE:
        raise ValueError(f"task must be one of {sorted(_INFERENCE)}, got {task!r}")
    for key in ("pred_logits", "pred_masks"):
        if key not in outputs:
            raise ValueError(f"outputs has no {key!r} entry (keys: {sorted(outputs)})")
    pred_logits, pred_masks = outputs["pred_logits"], outputs["pred_masks"]
    if pred_logits.dim() != 3 or pred_masks.dim() != 4 or pred_logits.shape[0] != pred_masks.shape[0]:
        raise ValueError(f"expected pred_logits (B, Q, K+1) and pred_masks (B, Q, h, w), got "
                         f"{tuple(pred_logits.shape)} and {tuple(pred_masks.shape)}")
    batch = pred_logits.shape[0]
    output_sizes = image_sizes if output_sizes is None else output_sizes
    if len(image_sizes) != batch or len(output_sizes) != batch:
        raise ValueError(f"batch of {batch} images but {len(image_sizes)} image_sizes and "
                         f"{len(output_sizes)} output_sizes")
    if padded_size is None:
        padded_size = outputs.get("padded_size") or tuple(4 * s for s in pred_masks.shape[-2:])
    inference = _INFERENCE[task]
    return [inference(pred_logits[i], pred_masks[i], padded_size=padded_size, image_size=image_sizes[i],
                      output_size=output_sizes[i], **options) for i in range(batch)]

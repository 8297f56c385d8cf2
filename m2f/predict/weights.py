"""`load_weights`: any weights `m2f predict` takes, as a model and the names of its classes."""

from collections.abc import Iterable
from pathlib import Path

import torch

from m2f.data.categories import Categories
from m2f.model import Mask2Former


def load_weights(source: str | Path, *, device: str | torch.device = "cpu", dataset: str | Path | None = None,
                 overrides: Iterable[str] = ()) -> tuple[Mask2Former, Categories]:
    """A model for inference (eval mode, `model.config` set, frozen BatchNorm folded into the convolutions by
    `m2f.batchnorm_folding`) and its label metadata, from any of:

    - a run directory (`m2f train` output, its checkpoint.pth) or an m2f checkpoint file;
    - the original repository's `model_final_*.pkl` (converted in memory by `m2f.convert`);
    - a transformers model directory (config.json + *.safetensors), or a hub id in the local cache.

    Args:
        device: where the model goes.
        dataset: the label metadata, a name of `m2f.data.metadata.DATASETS` or a categories JSON; default
            chosen from the model's config (`m2f.data.metadata.categories_for`).
        overrides: config overrides applied before building, e.g. ["model.deform_impl=torch",
            "test.object_mask_threshold=0.5"].

    Returns:
        (model, categories): `categories.names[k]` is class k's name; also `isthing`, ids and colours.

    Raises:
        FileNotFoundError: nothing loadable at `source`.
        ValueError: the weights do not fit their config, or `dataset` has another class count.
    """
    from m2f.batchnorm_folding import fold_frozen_batchnorm
    from m2f.data.metadata import categories_for
    from m2f.pretrained import load_pretrained
    from m2f.run_dir import RunDir

    path = Path(source).expanduser()
    if path.is_dir() and RunDir.at(path).has_checkpoint():
        path = RunDir.at(path).checkpoint
    model = load_pretrained(path if path.exists() else str(source), overrides=overrides, device=device)
    fold_frozen_batchnorm(model)
    return model, categories_for(model.config, dataset=dataset)

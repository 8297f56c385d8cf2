"""Pretrained Mask2Former models from local files, converting released weights on the fly.

m2f never downloads at run time unless asked for a hub id while the network works; everything else
reads local files (see docs/fidelity.md for where to get the released weights).

    >>> model = load_pretrained("checkpoints/r50_coco_panoptic.pth")  # doctest: +SKIP
    >>> model = load_pretrained("model_final_94dc52.pkl")  # the original's file, converted in memory  # doctest: +SKIP
    >>> model = load_pretrained("mask2former-swin-tiny-coco-panoptic/")  # a transformers directory  # doctest: +SKIP
"""

import dataclasses
import os
import re
import socket
import threading
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
from torch import Tensor, nn

from m2f.checkpoint import load
from m2f.config import Config, apply_overrides, from_dict
from m2f.convert import from_detectron2, from_transformers, load_source
from m2f.model import Mask2Former, build_model

HUB_FILES = ["*.json", "*.safetensors"]
_HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")
_PROBE_TIMEOUT_S = 3.0


def load_pretrained(source: str | Path | nn.Module | Mapping[str, Tensor], *, preset: str | None = None,
                    config: Any = None, overrides: Iterable[str] = (), device: str | torch.device = "cpu",
                    cache_dir: str | Path | None = None) -> Mask2Former:
    """Builds an m2f model (eval mode) with pretrained weights.

    Args:
        source: one of
            - an m2f checkpoint (`m2f convert` output or a training checkpoint: "model" and "config");
            - the original repository's detectron2 `model_final_*.pkl` (or a detectron2 `.pth`);
            - a transformers model directory (config.json + *.safetensors), or a `.safetensors` in one;
            - a transformers `Mask2FormerForUniversalSegmentation`, or its state dict with `config`;
            - a hub id such as "facebook/mask2former-swin-tiny-coco-panoptic": read from the local hub
              cache, else downloaded with `huggingface_hub` when the network answers; offline it raises
              a FileNotFoundError that says how to get the files.
        preset: for converted weights, the m2f preset the model was trained with (None: guessed from
            the weights; see `m2f.convert.from_detectron2`).
        config: the transformers config when `source` is a transformers state dict.
        overrides: config overrides applied before building, e.g. ["model.deform_impl=torch"].
        device: where the model is put.
        cache_dir: the hub cache for hub ids (default: huggingface_hub's).

    Returns:
        The model; its config is `model.config`.
    """
    if isinstance(source, nn.Module | Mapping):
        cfg, state = from_transformers(source, config, preset=preset)
        return _build(cfg, state, "transformers model", overrides, device)
    path = Path(source)
    if not path.exists():
        path = download_from_hub(str(source), cache_dir=cache_dir)
    if path.is_file() and path.suffix in (".pth", ".pt"):
        ckpt = load(path)
        if not isinstance(ckpt, dict):
            raise ValueError(f"{path} holds a {type(ckpt).__name__}, not a checkpoint dict")
        if "config" in ckpt and "model" in ckpt:
            return _build(from_dict(ckpt["config"]), ckpt["model"], str(path), overrides, device)
        cfg, state = from_detectron2(ckpt, preset)
        return _build(cfg, state, str(path), overrides, device)
    cfg, state = load_source(path, preset=preset)
    return _build(cfg, state, str(path), overrides, device)


def download_from_hub(repo_id: str, *, cache_dir: str | Path | None = None) -> Path:
    """The local directory of a transformers Mask2Former on the Hugging Face hub.

    The local hub cache is tried first (works offline after `huggingface-cli download`); a download is
    attempted only when HF_HUB_OFFLINE is unset and the hub answers within a few seconds.

    Raises:
        FileNotFoundError: `repo_id` is neither a local path nor available, with instructions.
    """
    hint = (f"{repo_id!r} is not a local path and could not be fetched from the Hugging Face hub. "
            f"Download it by hand where there is network, e.g. `huggingface-cli download {repo_id} --include "
            f"{' '.join(repr(p) for p in HUB_FILES)} --local-dir {repo_id.split('/')[-1]}` (or the same files from "
            f"https://huggingface.co/{repo_id}/tree/main), copy that directory here and pass its path. "
            "For the original repository's weights, download model_final_*.pkl from the links in its "
            "MODEL_ZOO.md and pass the file (see docs/fidelity.md).")
    if not _HUB_ID.fullmatch(repo_id):
        raise FileNotFoundError(f"{repo_id} does not exist (and is not a hub id like 'owner/name')")
    try:
        from huggingface_hub import constants, snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError
    except ImportError as err:
        raise FileNotFoundError(hint + " (huggingface_hub is not installed)") from err
    try:
        return Path(snapshot_download(repo_id, allow_patterns=HUB_FILES, cache_dir=cache_dir, local_files_only=True))
    except LocalEntryNotFoundError:
        pass  # not in the cache: try the network below
    if _env_flag("HF_HUB_OFFLINE") or not _reachable(constants.ENDPOINT):
        raise FileNotFoundError(hint + " (offline)")
    try:
        return Path(snapshot_download(repo_id, allow_patterns=HUB_FILES, cache_dir=cache_dir, etag_timeout=10))
    except Exception as err:
        raise FileNotFoundError(f"{hint} (download failed: {err})") from err


def _build(cfg: Config, state: Mapping[str, Tensor], origin: str, overrides: Iterable[str],
           device: str | torch.device) -> Mask2Former:
    # The weights come from the checkpoint: a backbone file named in a training config is not needed.
    cfg = apply_overrides(dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, backbone_weights=None)),
                          overrides)
    model = build_model(cfg)
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        raise ValueError(f"{origin} does not fit the model of its config ({cfg.model.backbone}): {err}") from err
    model.config = cfg
    return model.to(device).eval()


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _reachable(url: str) -> bool:
    """Whether a TCP connection to the URL's host opens within a few seconds.

    The probe runs in a daemon thread because name resolution ignores socket timeouts and can hang.
    """
    parsed = urlparse(url)
    address = (parsed.hostname or "", parsed.port or (443 if parsed.scheme == "https" else 80))
    result: list[bool] = []

    def probe() -> None:
        try:
            socket.create_connection(address, timeout=_PROBE_TIMEOUT_S).close()
            result.append(True)
        except OSError:
            result.append(False)

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(_PROBE_TIMEOUT_S + 1.0)
    return bool(result and result[0])

"""The README's Python snippet runs as printed (issue 22: `images` was undefined, `.eval()` missing) and
its masks at the input size are what the post-processing computes."""

import re
from pathlib import Path

import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def _snippet() -> str:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    (block,) = [b for b in blocks if "m2f.build_model" in b]
    return block


def test_the_readme_snippet_runs_and_gives_masks_at_the_input_size():
    namespace: dict = {}
    exec(compile(_snippet(), str(README), "exec"), namespace)
    out, full = namespace["out"], namespace["full"]
    assert not namespace["model"].training
    assert out["padded_size"] == (480, 640) and out["pred_masks"].shape == (1, 200, 120, 160)
    assert full.shape == (200, 470, 630)
    assert len(out["aux_outputs"]) == 9 and out["capture"][0]["attn_weights"].shape[:3] == (1, 8, 200)
    # Upsampled to the padded 480x640, then the 10 padded rows and columns cropped away.
    expected = torch.nn.functional.interpolate(out["pred_masks"], size=(480, 640), mode="bilinear",
                                               align_corners=False)[0, :, :470, :630]
    torch.testing.assert_close(full, expected)

"""Released or trained weights on your own images: `predict` (Python) and `m2f predict` (files).

    >>> model, categories = load_weights("model_final_94dc52.pkl")  # doctest: +SKIP
    >>> [p] = predict(model, ["photo.jpg"], task="panoptic", categories=categories)  # doctest: +SKIP
    >>> [(s.name, round(s.score, 2), s.isthing, s.mask.shape) for s in p.segments]  # doctest: +SKIP

- `results.py`: `predict`, and the `Prediction` / `Segment` result types;
- `weights.py`: `load_weights(source) -> (model, categories)` for every kind of weights;
- `draw.py`: the overlay picture;
- `files.py`: input reading (conversion notes) and the COCO result files;
- `run.py`: the `m2f predict` driver (inputs, batches, resume).
"""

from m2f.predict.draw import draw_prediction
from m2f.predict.results import Prediction, Segment, predict
from m2f.predict.run import collect_inputs, predict_files
from m2f.predict.weights import load_weights

__all__ = ["Prediction", "Segment", "collect_inputs", "draw_prediction", "load_weights", "predict", "predict_files"]

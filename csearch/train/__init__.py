"""Training the paper's category classifier (`python -m csearch.train classifier`).

One module per concern:
- config: TrainConfig, its checks and loading (YAML + overrides);
- data: labelled records, the stratified validation split, decoded images;
- cache: the on-disk cache of the frozen bottom's activations;
- history: RUN_DIR/history.csv;
- classifier: `train_classifier`, one run from a catalogue to a RUN_DIR (resumable);
- cli: the `python -m csearch.train` front end.
Keras is needed only while training: cut (where the model is split for caching), batches (what
fit() reads) and callbacks (one resumable fit() stage) import it, and only `train_classifier`
imports them, so importing csearch.train does not import Keras.
"""

from .classifier import train_classifier
from .config import TrainConfig, load_train_config, validate
from .data import PreparedData, Split, load_images, prepare_data, stratified_split
from .history import read_history

__all__ = [
    "PreparedData",
    "Split",
    "TrainConfig",
    "load_images",
    "load_train_config",
    "prepare_data",
    "read_history",
    "stratified_split",
    "train_classifier",
    "validate",
]

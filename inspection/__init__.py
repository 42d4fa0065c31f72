"""Domain core: records and codec, data sets, preprocessing, encoders, model, training, evaluation, store."""

__version__ = "0.1.0"

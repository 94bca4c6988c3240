"""Multi-stain self-supervised pretraining of pathology foundation models on whole-slide images."""

__version__ = "0.1.0"

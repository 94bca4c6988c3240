"""Stain knowledge shared by the data pipeline and the model: vocabulary, colour deconvolution, augmentation."""

from stain.vocabulary import UNKNOWN, StainLabel, StainVocabulary

__all__ = ["UNKNOWN", "StainLabel", "StainVocabulary"]

"""Property heads on crystal encoders: prediction with uncertainty, and prediction from CIF files."""

from mmmat.heads.predict import predict_files
from mmmat.heads.property import PropertyModel, Target, parse_targets, select_labelled

__all__ = ["PropertyModel", "Target", "parse_targets", "predict_files", "select_labelled"]

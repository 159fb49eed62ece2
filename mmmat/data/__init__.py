"""Record schema, modality renderers (XRD, image, text), periodic graphs, shard reading and collation."""

from mmmat.data.schema import MaterialRecord, RecordError, TextItem

__all__ = ["MaterialRecord", "RecordError", "TextItem"]

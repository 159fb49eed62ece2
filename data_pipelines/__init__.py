"""Pipelines that turn raw sources into webdataset shards (``mmmat data build``)."""

"""Readers for every PAB file format (`tpas.data.pab`); datasets and synthetic data live beside them."""

from .pab import (
    GalleryImage,
    GroundTruth,
    Query,
    TestRecord,
    TrainRecord,
    list_gallery,
    load_ground_truth,
    read_gallery_ids,
    read_queries,
    read_query_index,
    read_test_annotation,
    read_train_annotation,
)

__all__ = [
    "GalleryImage",
    "GroundTruth",
    "Query",
    "TestRecord",
    "TrainRecord",
    "list_gallery",
    "load_ground_truth",
    "read_gallery_ids",
    "read_queries",
    "read_query_index",
    "read_test_annotation",
    "read_train_annotation",
]

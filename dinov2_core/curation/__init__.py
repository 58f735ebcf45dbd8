"""LVD-142M-style data curation algorithms (paper §3 and App. A): embed -> kNN -> dedup / decontaminate
-> retrieve. Pure functions over arrays, PIL images and DataFrames; storage and orchestration live elsewhere.
"""

from .components import component_sizes, components_from_knn, connected_components, knn_edges
from .decontaminate import decontaminate
from .dedup import deduplicate, pick_representatives, view_edges
from .embed import (
    CD_DECONTAM_THRESHOLD,
    CD_DEDUP_THRESHOLD,
    CD_DIM,
    BackboneEmbedder,
    CopyDetectionEmbedder,
    EmbedderInfo,
    copy_detection_descriptor,
    copy_detection_views,
    describe_embedder,
)
from .knn import KnnResult, build_index, knn_search
from .retrieve import cluster_based_retrieval, kmeans, retrieve, sample_based_retrieval

__all__ = [
    "CD_DECONTAM_THRESHOLD",
    "CD_DEDUP_THRESHOLD",
    "CD_DIM",
    "BackboneEmbedder",
    "CopyDetectionEmbedder",
    "EmbedderInfo",
    "KnnResult",
    "build_index",
    "cluster_based_retrieval",
    "component_sizes",
    "components_from_knn",
    "connected_components",
    "copy_detection_descriptor",
    "copy_detection_views",
    "decontaminate",
    "deduplicate",
    "describe_embedder",
    "kmeans",
    "knn_edges",
    "knn_search",
    "pick_representatives",
    "retrieve",
    "sample_based_retrieval",
    "view_edges",
]

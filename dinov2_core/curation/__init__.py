"""LVD-142M-style data curation algorithms (paper §3 and App. A): embed -> kNN -> dedup / decontaminate
-> retrieve, plus local-feature verification of copy candidates. Pure functions over arrays, PIL images and
DataFrames that take their thresholds as arguments; storage, orchestration and defaults live elsewhere.
"""

from .components import component_sizes, components_from_knn, connected_components, knn_edges
from .decontaminate import decontaminate
from .dedup import deduplicate, pick_representatives, verified_edges, view_edges
from .embed import (
    CD_DIM,
    BackboneEmbedder,
    CopyDetectionEmbedder,
    EmbedderInfo,
    copy_detection_descriptor,
    copy_detection_views,
    describe_embedder,
)
from .knn import KnnResult, build_index, knn_search
from .result import CurationResult
from .retrieve import balanced_sampling, cluster_based_retrieval, kmeans, retrieve, sample_based_retrieval
from .verify import LocalFeatures, PairVerifier, dense_similarity, local_features, verify_pair

__all__ = [
    "CD_DIM",
    "BackboneEmbedder",
    "CopyDetectionEmbedder",
    "CurationResult",
    "EmbedderInfo",
    "KnnResult",
    "LocalFeatures",
    "PairVerifier",
    "balanced_sampling",
    "build_index",
    "cluster_based_retrieval",
    "component_sizes",
    "components_from_knn",
    "connected_components",
    "copy_detection_descriptor",
    "copy_detection_views",
    "decontaminate",
    "deduplicate",
    "dense_similarity",
    "describe_embedder",
    "kmeans",
    "knn_edges",
    "knn_search",
    "local_features",
    "pick_representatives",
    "retrieve",
    "sample_based_retrieval",
    "verified_edges",
    "verify_pair",
    "view_edges",
]

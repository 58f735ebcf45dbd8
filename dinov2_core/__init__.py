"""dinov2_core: the model, loss, data, curation and evaluation library of the DINOv2 pipeline.

Knows torch, torchvision, numpy, faiss and webdataset; never Prefect, DVC, great-expectations or S3 clients.
"""

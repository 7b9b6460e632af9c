"""Datasets (MedMNIST npz, ImageFolder, built-in phantom) and their federated partitioning."""

from fedpggan.data.dataset import ImageDataset
from fedpggan.data.sources import open_dataset
from fedpggan.data.partition import partition, partition_summary, partition_table
from fedpggan.data.phantom import open_phantom

__all__ = ["ImageDataset", "open_dataset", "open_phantom", "partition", "partition_summary", "partition_table"]

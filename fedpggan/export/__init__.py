"""Shareable synthetic datasets from a trained run: MedMNIST npz, ImageFolder PNGs, datasheet."""

from fedpggan.export.exporter import export_run
from fedpggan.export.options import ExportOptions

__all__ = ["ExportOptions", "export_run"]

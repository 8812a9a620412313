from pneumonia.data.datamodule import KermanyDataModule
from pneumonia.data.kermany import Record, scan_kermany, split_records
from pneumonia.data.transforms import ProportionalCrop

__all__ = ["KermanyDataModule", "ProportionalCrop", "Record", "scan_kermany", "split_records"]

"""DICOM archive -> de-identified webdataset shards, and back."""

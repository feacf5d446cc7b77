"""Data: decoding, the leak-free split, annotated-photo tiles, transforms, loaders and the LightningDataModule."""

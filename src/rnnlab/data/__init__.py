"""One module per task: fetch (raw data), preprocess (tensors ready to train) and a LightningDataModule."""

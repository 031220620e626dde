"""The special tokens every rnnlab vocabulary starts with, shared by the data modules that build
vocabularies and the models that read them. A leaf module: it imports nothing of rnnlab's."""

PAD, UNK = "<pad>", "<unk>"
PAD_ID, UNK_ID = 0, 1  # their ids: every vocabulary is [PAD, UNK, ...]

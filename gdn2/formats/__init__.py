"""Checkpoint formats, one module each: the official lit_gpt container, fla Hugging Face folders, our native folder.

Every reader returns a `Source` (base.py): a state dict already in our parameter names plus the Config it implies
and a record of what was inferred. `gdn2.checkpoint.load_checkpoint` picks the reader and builds the model.
"""

"""fastattn.models: thin model definitions built on fastattn.nn (installed from the top-level models/).

Empty so far: the architectures (Transformer, BERT, ViT/DeiT, Swin, SETR, Perceiver, ViViT, TimeSformer) and
the SAM optimizer come with a later issue.
"""

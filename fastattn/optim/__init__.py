"""fastattn.optim: optimizers that go with the models (SAM)."""

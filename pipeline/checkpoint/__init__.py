"""The checkpoint format: the training state as a state dict, saved, read back and checked.

format (build, save, prune, load, compatible?, digest), read (torch.load with
weights_only, telling a corrupt file from an unreadable one). May import the
shared core and `pipeline.model`; imported by train, export, evaluate and verify:
they all reach checkpoints through here, never through the training loop.
"""

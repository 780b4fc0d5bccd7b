"""`mm train`: the run's setup, the training loop and everything around it.

setup (device → data → model, optimizer → resume), loop (train_step, save,
finish), run_data (the run's sources and validation), optim, compiling,
distributed (DDP/FSDP2), resume, branch (decay branches), spike (the loss-spike guard),
runlock, progress and plots, tracking and trackers. May import everything below it (core,
data, model, checkpoint, export, evaluate); the train stage imports it (and the eval stage its metrics writer).
"""

"""`mm train`: the run's setup, the training loop and everything around it.

setup (device → data → model, optimizer → resume), loop (train_step, save,
finish), run_data (the run's sources and validation), optim, compiling,
distributed (DDP/FSDP2), resume, runlock, progress and plots, tracking and
trackers. May import everything below it (core, data, model, checkpoint,
export, evaluate); only the train stage imports it.
"""

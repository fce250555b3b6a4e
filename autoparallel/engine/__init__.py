"""The training engine run by every worker (trainer, LoRA trainer, optimizer, checkpoints, metrics, fault
injection); the top of autoparallel/, started by launch/worker.py."""

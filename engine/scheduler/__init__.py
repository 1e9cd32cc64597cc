"""Torch-free scheduling: requests, policies, the scheduler and its messages to the worker."""

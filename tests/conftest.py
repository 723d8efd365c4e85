"""Shared test set-up: offline hub, deterministic threads, and the gpu marker skip on CPU machines."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")

import pytest


def pytest_collection_modifyitems(config, items):
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except Exception:  # torch missing is a set-up error reported elsewhere
        has_cuda = False
    if has_cuda:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU; this machine has none (run on a lent GPU with -m gpu)")
    for item in items:
        if item.get_closest_marker("gpu") is not None:  # not item.keywords: it also holds path parts
            item.add_marker(skip)

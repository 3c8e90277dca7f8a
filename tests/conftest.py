import os

# Nothing is downloaded in tests: every checkpoint is built on disk by the tests themselves.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")

"""detox-harness: make a seq2seq summarizer less toxic with PPO, and prove it with tests."""

__version__ = "0.1.0"

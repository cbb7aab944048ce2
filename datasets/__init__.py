"""Built-in evaluation datasets (``markov-rsa eval arith|gsm8k|math500``); README.md says where each
comes from."""

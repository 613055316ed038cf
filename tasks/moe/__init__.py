"""The shared MoE runtime: a compact GPT-MoE, its training corpus and a single-process trainer.

Used by Lazarus (elastic expert-parallel training) and HeterMoE. ``model`` holds the
network, ``corpus`` the synthetic training text and its tokenizer, ``train`` the
reference training loop a distributed trainer must reproduce.
"""

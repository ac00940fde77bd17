"""Corpus -> tokenizer -> Megatron indexed dataset (.bin/.idx), the data side of difftron.

Run `python -m data_prep --help` for the command line.
"""

"""The text side: a sentencepiece tokenizer that turns prompts into ids and back, exactly.

``from tokenizer import TextTokenizer``; see :mod:`tokenizer.text`.
"""

from tokenizer.text import TextTokenizer, TruncationWarning, words

__all__ = ["TextTokenizer", "TruncationWarning", "words"]

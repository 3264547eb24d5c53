"""Text in and out (layer: foundation): the tokenizers (sentencepiece, Hugging Face) and the one chat template."""

"""Dataset building blocks of prepare_data: the embedded corpus, the math generator, user sources."""

"""Models: the feed ranker and its interaction blocks, BERT and Llama encoders, the post
encoder and the member/item dual encoder."""

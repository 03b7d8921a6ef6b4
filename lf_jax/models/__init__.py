"""Models: the feed ranker and its interaction blocks; text encoders come later."""

"""The post_texts dataset: its tfds builder (post_texts.py) and simulator (simulator.py)."""

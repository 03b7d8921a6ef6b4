"""The feed_logs dataset: its tfds builder (feed_logs.py) and simulator (simulator.py)."""

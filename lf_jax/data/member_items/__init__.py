"""The member_items dataset: its tfds builder (member_items.py) and simulator (simulator.py)."""

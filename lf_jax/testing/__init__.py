"""Test helpers shipped with the library: oracles, compile counting, HLO inspection."""

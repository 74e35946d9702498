"""Communication: collectives named after what they do, over explicitly passed process groups."""

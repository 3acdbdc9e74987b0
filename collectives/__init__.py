"""commlib collectives: the training-script API (filled by later issues)."""
